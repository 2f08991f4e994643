"""glmtune.models.speed's host-side helpers (the kernels themselves are tested on the GPU, tests/train/test_speed_gpu.py)."""
from __future__ import annotations

import pytest

from glmtune.models.speed import padded_offsets


def test_padded_offsets():
    assert padded_offsets([3, 2], 8, 4) == [0, 3, 5, 8, 8]       # tail padding is a segment
    assert padded_offsets([3, 5], 8, 3) == [0, 3, 8, 8]          # exact fit: no padding segment
    assert padded_offsets([], 4, 2) == [0, 4, 4]                 # all padding (a prefill graph's capture)
    with pytest.raises(ValueError, match="do not fit a row of 8"):
        padded_offsets([5, 4], 8, 4)
    with pytest.raises(ValueError, match="exceed max_segments=2"):
        padded_offsets([1, 1], 8, 2)
