"""English prose from the system's man pages (``/usr/share/man/man[1-8]``), offline.

Roff markup is stripped (macros become paragraph breaks, examples and tables are dropped),
then the text goes through the corpus's cleaning (:func:`tensorfold.pretrained.corpus._clean`).
Pages are read in a fixed order (by a hash of the file name), so the result depends only on
which man pages are installed; a machine without man pages gives nothing.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from .corpus import gzip_file_sentences

__all__ = ["roff_to_text", "chunk", "man_documents", "man_sentences"]

MAN_DIR = Path("/usr/share/man")

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),  # string registers (pod2man's quotes)
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[&c%]"), ""),
    (re.compile(r"\\e"), r"\\"),
    (re.compile(r"\\ "), " "),
]
_TEXT_MACRO = re.compile(r"^\.(B|I|BR|IR|BI|IB|RB|RI|SM|SB)\s+(.*)$")


def roff_to_text(text: str) -> str:
    """Man-page source to plain paragraphs: macros become breaks, examples are dropped."""
    out: list[str] = []
    verbatim = False
    for line in text.splitlines():
        if line.startswith((".nf", ".EX")):
            verbatim = True
        elif line.startswith((".fi", ".EE")):
            verbatim = False
        if verbatim or line.startswith((".fi", ".EE")):
            out.append("")
            continue
        macro = _TEXT_MACRO.match(line)
        if macro:
            line = macro.group(2).replace('"', "")
        elif line.startswith((".", "'")):
            out.append("")
            continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out)


def chunk(sentences: list[str], max_words: int) -> list[str]:
    """Consecutive sentences joined into passages of up to ``max_words`` words."""
    docs: list[str] = []
    current: list[str] = []
    words = 0
    for sent in sentences:
        if current and words + len(sent.split()) > max_words:
            docs.append(" ".join(current))
            current, words = [], 0
        current.append(sent)
        words += len(sent.split())
    if current:
        docs.append(" ".join(current))
    return docs


def _pages(max_words: int, excluded: set[str]) -> list[list[str]]:
    """The kept sentences of each page, in the fixed order, until about ``max_words``."""
    files = [p for sec in "12345678" for p in (MAN_DIR / f"man{sec}").glob("*.gz")]
    return gzip_file_sentences(files, roff_to_text, max_words, excluded)


def man_documents(max_words: int, excluded: set[str]) -> tuple[list[str], int]:
    """Passages of up to 200 words of English man pages, until about ``max_words`` words;
    sentences in ``excluded`` (lower case) are skipped and every kept one is added to it.
    Returns the passages and the number of pages they come from."""
    pages = _pages(max_words, excluded)
    return [d for page in pages for d in chunk(page, 200)], len(pages)


@lru_cache(maxsize=4)
def _man_sentences(max_words: int) -> tuple[str, ...]:
    return tuple(s for page in _pages(max_words, set()) for s in page)


def man_sentences(max_words: int = 200_000) -> list[str]:
    """Clean sentences of the man pages, up to about ``max_words`` words, deduplicated."""
    return list(_man_sentences(max_words))
