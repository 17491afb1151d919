"""English prose from the system's GNU info manuals (``/usr/share/info/*.info*.gz``), offline.

An info file is plain text cut into nodes by the ``\\x1f`` character; each node starts with
a ``File: ..., Node: ...`` header line, and menu entries start with ``*``. Those lines are
dropped, and nodes that hold a licence (the GNU Free Documentation License and the GPL are
appended to many manuals) are skipped, since licence texts are part of the held-out text of
another source (:mod:`tensorfold.pretrained.other_text`). The rest goes through the corpus's
cleaning (:func:`tensorfold.pretrained.corpus._clean`). Files are read in a fixed order (by
a hash of the file name) until about ``max_words`` words; a machine without info manuals
gives nothing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .corpus import gzip_file_sentences

__all__ = ["info_sentences"]

INFO_DIR = Path("/usr/share/info")
_LICENCE_MARKS = ("GNU Free Documentation License", "GNU General Public License", "Copying")


def _node_text(node: str) -> str | None:
    """The prose of one node, or None for a licence node."""
    lines = node.splitlines()
    header = next((line for line in lines if line.startswith("File:")), "")
    if any(mark in header for mark in _LICENCE_MARKS):
        return None
    body = [line for line in lines if not line.startswith(("File:", "*", "Tag Table:"))]
    text = "\n".join(body)
    if "Free Documentation License" in text or "GNU General Public License" in text:
        return None
    return text


def _manual_text(source: str) -> str:
    """A manual's prose: its nodes but the preamble (before the first) and licence nodes."""
    nodes = (_node_text(node) for node in source.split("\x1f")[1:])
    return "\n\n".join(text for text in nodes if text)


@lru_cache(maxsize=4)
def _info_sentences(max_words: int) -> tuple[str, ...]:
    files = INFO_DIR.glob("*.info*.gz")
    return tuple(
        s for kept in gzip_file_sentences(files, _manual_text, max_words, set()) for s in kept
    )


def info_sentences(max_words: int = 200_000) -> list[str]:
    """Clean sentences of the info manuals, up to about ``max_words`` words, deduplicated."""
    return list(_info_sentences(max_words))
