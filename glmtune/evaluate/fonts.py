"""Find a font that can draw Chinese class names in matplotlib plots.

matplotlib's default DejaVu Sans has no CJK glyphs: Chinese labels come out as empty boxes ("tofu").
We look, in order, for (1) a font file named by $GLMTUNE_CJK_FONT, (2) a CJK family already in
matplotlib's font cache, (3) a CJK font file on disk that the cache does not know yet (matplotlib's
cache is built once, so a font installed by apt afterwards is missing from it), (4) the fonts bundled
by the pip package `mplfonts`. Nothing found -> None and one logged warning saying how to fix it.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Preferred families, best first (simplified-Chinese variants before others).
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
    "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC",
    "Heiti SC", "Noto Sans CJK JP", "AR PL UMing CN", "Droid Sans Fallback",
)
# File names of the same fonts, for files the font cache has not seen.
_CJK_FILE_RE = re.compile(r"(NotoSansCJK|NotoSansSC|SourceHanSans|wqy-|SimHei|msyh|PingFang|"
                          r"DroidSansFallback|uming)", re.IGNORECASE)
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", str(Path.home() / ".fonts"),
              str(Path.home() / ".local/share/fonts"), "/Library/Fonts", "/System/Library/Fonts",
              "C:/Windows/Fonts")

FIX_HINT = ("install a CJK font, e.g. `apt-get install fonts-wqy-microhei` (or fonts-noto-cjk), "
            "or `pip install mplfonts`, or set GLMTUNE_CJK_FONT=/path/to/font.ttf")


def _register(path: str | Path) -> str | None:
    """Add a font file to matplotlib's manager; return its family name (None if unreadable)."""
    from matplotlib import font_manager
    try:
        font_manager.fontManager.addfont(str(path))
        return font_manager.FontProperties(fname=str(path)).get_name()
    except Exception as e:  # a broken font file should not stop the report
        log.warning("could not load font %s: %s", path, e)
        return None


def _from_cache() -> str | None:
    from matplotlib import font_manager
    known = {f.name for f in font_manager.fontManager.ttflist}
    return next((fam for fam in CJK_FAMILIES if fam in known), None)


def _from_disk() -> str | None:
    from matplotlib import font_manager
    dirs = [d for d in _FONT_DIRS if os.path.isdir(d)]
    files = sorted(p for p in font_manager.findSystemFonts(fontpaths=dirs) if _CJK_FILE_RE.search(Path(p).name))
    # Prefer sans (Noto/Source Han Sans, WenQuanYi) over serif (uming) by the family order above.
    names = [(p, _register(p)) for p in files]
    ranked = sorted((CJK_FAMILIES.index(n) if n in CJK_FAMILIES else 99, n) for _, n in names if n)
    return ranked[0][1] if ranked else None


def _from_mplfonts() -> str | None:
    try:
        import mplfonts  # type: ignore[import-not-found]
    except ImportError:
        return None
    font_dir = Path(mplfonts.__file__).parent / "fonts"
    for name in ("NotoSansCJKsc-Regular.otf", "SimHei.ttf"):
        if (font_dir / name).exists():
            return _register(font_dir / name)
    return None


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """Return a matplotlib family name that has CJK glyphs, or None (after one warning)."""
    env = os.environ.get("GLMTUNE_CJK_FONT")
    if env:
        name = _register(env) if Path(env).exists() else None
        if name:
            return name
        log.warning("GLMTUNE_CJK_FONT=%s is not a readable font file; searching elsewhere", env)
    name = _from_cache() or _from_disk() or _from_mplfonts()
    if name is None:
        log.warning("no CJK font found: Chinese labels in plots will show as boxes. Fix: %s", FIX_HINT)
    return name


def has_cjk(text: str) -> bool:
    """True if text contains a CJK ideograph (the case where the default font fails)."""
    return any("\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in text)
