"""The default English text: what ``compress`` calibrates and distils on without ``--data``.

Technical prose found on the machine, nothing downloaded: the Python documentation's
sentences (:mod:`tensorfold.pretrained.corpus`), then the man pages
(:mod:`tensorfold.pretrained.man_pages`) and the GNU info manuals
(:mod:`tensorfold.pretrained.info_pages`) up to a number of words each. The held-out text of
another source (:mod:`tensorfold.pretrained.other_text`) excludes every sentence of it.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["bundled_sentences", "MAN_PAGE_WORDS", "INFO_WORDS"]

# Words of each extra source: more variety than the Python docs alone, read in seconds.
MAN_PAGE_WORDS = 60_000
INFO_WORDS = 250_000


@lru_cache(maxsize=1)
def _bundled() -> tuple[str, ...]:
    from .corpus import english_sentences
    from .info_pages import info_sentences
    from .man_pages import man_sentences

    seen: set[str] = set()
    out: list[str] = []
    for sent in [*english_sentences(), *man_sentences(MAN_PAGE_WORDS), *info_sentences(INFO_WORDS)]:
        if sent.lower() not in seen:
            seen.add(sent.lower())
            out.append(sent)
    return tuple(out)


def bundled_sentences() -> list[str]:
    """The default text's sentences, each once, in source order."""
    return list(_bundled())
