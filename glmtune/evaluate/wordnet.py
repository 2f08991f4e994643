"""Is WordNet (needed by NLTK's METEOR for synonym matching) usable offline?

`nltk.download` cannot reach the internet on our machines, so `scripts/setup_wordnet.sh` builds the
corpus from Debian's wordnet packages. Here we only detect the result and explain the fix; METEOR is
then reported as unavailable instead of crashing the whole evaluation.
"""
from __future__ import annotations

import functools

FIX = ("run `bash scripts/setup_wordnet.sh` (installs Debian wordnet-base + wordnet-sense-index and "
       "builds ~/nltk_data/corpora/wordnet), or `python -m nltk.downloader wordnet` on a machine with "
       "internet, or point NLTK_DATA at a folder containing corpora/wordnet")


@functools.lru_cache(maxsize=1)
def wordnet_status() -> tuple[bool, str]:
    """(available, message). Loads the corpus once: a lookup that works proves every file is there."""
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        if not wordnet.synsets("dog"):
            return False, f"WordNet loaded but has no English synsets. Fix: {FIX}"
        return True, f"WordNet {wordnet.get_version()} found at {wordnet.root}"
    except LookupError:
        return False, f"METEOR needs WordNet, which NLTK cannot find. Fix: {FIX}"
    except Exception as e:  # e.g. a half-built folder missing `lexnames`
        return False, f"WordNet is present but unreadable ({type(e).__name__}: {e}). Fix: {FIX}"
