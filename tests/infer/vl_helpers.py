"""Pictures for vision-language tests (shared with tests/serve, which puts this folder on sys.path)."""
from __future__ import annotations

import base64
from pathlib import Path


def write_picture(path: Path, seed: int, size=(80, 60)) -> Path:
    """A random RGB PNG (width, height); different seeds give different pictures."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
