"""English text from a source other than the Python documentation, for held-out evaluation.

The calibration corpus (:mod:`tensorfold.pretrained.corpus`) is built from the Python
documentation. To measure how a compressed language model does on *different* English,
this module collects prose from three other places found on a Debian machine with Python
installed, read in this order (a missing source is skipped; the others still count):

1. ``/usr/share/common-licenses/*``: the full license texts shipped by Debian's ``base-files``
   package (GPL, LGPL, GFDL, Apache, MPL, Artistic, ...). Symbolic links are read once.
2. ``/usr/share/doc/*/copyright``: each installed Debian package's copyright file. Files in the
   machine-readable format (DEP-5, first line ``Format: ...``) contribute only the bodies of
   their ``License:``, ``Comment:`` and ``Disclaimer:`` fields, with the ``" ."`` lines read as
   paragraph breaks; the ``Files:`` and ``Copyright:`` fields (paths, years, names) are
   dropped. Free-form copyright files are read whole.
3. The long descriptions in the ``METADATA`` of the installed Python distributions
   (:mod:`importlib.metadata`), sorted by normalised name, except tensorfold's own (its README
   changes with the code). Fenced code blocks are removed; Markdown links and emphasis are
   reduced to their text.

Every text goes through the same cleaning as the calibration corpus
(:func:`tensorfold.pretrained.corpus._clean`: paragraphs holding code or list markup are
dropped; a sentence has 8 to 40 words, starts with a capital letter, ends with ``.``, ``!``
or ``?``, has no code-like characters and is mostly alphabetic words), then through a
stricter filter for what licenses and package descriptions add: no e-mail addresses, URLs,
paths, angle brackets, copyright signs, years, underscores, tabs or ellipses, balanced
parentheses and double quotes, at least 80% plain words (letters with inner apostrophes or
hyphens, punctuation around them), and no sentence that ends on a single character or an
abbreviation (``e.g.``, ``Inc.``), which is where the splitter cut too early.

A sentence is kept once (compared ignoring case), the first time it is met in the order
above, and never if it is also one of the default text's sentences
(:func:`tensorfold.pretrained.bundled.bundled_sentences`).
Nothing is downloaded. What is found depends on the installed Debian and Python packages;
results are cached for the life of the process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tensorfold.pretrained.bundled import bundled_sentences
from tensorfold.pretrained.corpus import _clean

__all__ = ["other_source_sentences", "other_source_documents"]

_LICENSE_DIR = "/usr/share/common-licenses"
_DOC_DIR = "/usr/share/doc"
_USE_METADATA = True

# A document grows paragraph by paragraph until it has at least this many words.
_DOC_WORDS = 150

_NOISE = re.compile(
    r"@|https?:|www\.|/|<|>|©|\(c\)|\b(?:1[89]|20)\d\d\b|_|\.\.\.|…|\t|\s\.(?:\s|$)",
    re.IGNORECASE,
)
_BAD_END = re.compile(r"(?:\b\w|\b(?:e\.g|i\.e|etc|vs|Inc|Ltd|Co|Corp|Jr|Dr|Mr|Mrs|Ms|St|No))\.$")
# A word of prose: letters, inner apostrophes or hyphens, and punctuation around it.
_PLAIN_WORD = re.compile(r"^[(\"“'‘]*[A-Za-z]+(?:['’-][A-Za-z]+)*[)\"”'’,.;:!?]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
_MD_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
_MD_STRONG = re.compile(r"(\*\*|__)(?=\S)([^*\n]+?)(?<=\S)\1")
_DEP5_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]?(.*)$")
_DEP5_KEEP = frozenset({"license", "comment", "disclaimer"})


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # unreadable or vanished: the source is simply smaller
        return ""


def _license_texts(folder: str) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        return []
    texts: list[str] = []
    seen: set[Path] = set()
    for path in sorted(root.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts.append(_read(real))
    return texts


def _dep5_prose(text: str) -> str:
    """The license, comment and disclaimer bodies of a machine-readable copyright file."""
    out: list[str] = []
    keep = False
    for line in text.splitlines():
        if not line.strip():
            keep = False
            out.append("")
            continue
        field = _DEP5_FIELD.match(line) if not line[0].isspace() else None
        if field:
            keep = field.group(1).lower() in _DEP5_KEEP
            out.append("")
            if keep and field.group(1).lower() != "license":  # License's first line is a name
                out.append(field.group(2))
            continue
        if keep:
            body = line.strip()
            out.append("" if body == "." else body)
    return "\n".join(out)


def _copyright_texts(folder: str) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        return []
    texts: list[str] = []
    for path in sorted(root.glob("*/copyright")):
        text = _read(path)
        texts.append(_dep5_prose(text) if text.startswith("Format:") else text)
    return texts


def _markdown_prose(text: str) -> str:
    text = _FENCE.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    return _MD_STRONG.sub(r"\2", text)


def _metadata_texts() -> list[str]:
    by_name: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        if meta is None:  # a distribution folder without its METADATA file
            continue
        name = re.sub(r"[-_.]+", "-", (meta.get_all("Name") or [""])[0].lower())
        if not name or name == "tensorfold" or name in by_name:
            continue
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        if not isinstance(body, str) or not body.strip():
            # Metadata before version 2.1 keeps the description in a folded header.
            folded = (meta.get_all("Description") or [""])[0]
            body = re.sub(r"\n {7}\|?", "\n", folded)
        by_name[name] = _markdown_prose(body)
    return [by_name[k] for k in sorted(by_name)]


def _sentences_of(paragraph: str) -> Iterable[str]:
    for sent in _clean(paragraph):
        sent = " ".join(sent.split())
        if _NOISE.search(sent) or _BAD_END.search(sent):
            continue
        if sent.count("(") != sent.count(")") or sent.count('"') % 2:
            continue
        words = sent.split()
        if sum(bool(_PLAIN_WORD.match(w)) for w in words) < 0.8 * len(words):
            continue
        yield sent


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@lru_cache(maxsize=4)
def _collect(license_dir: str, doc_dir: str, use_metadata: bool) -> tuple[tuple[str, ...], ...]:
    """Documents as tuples of sentences, in source order; each sentence occurs once."""
    texts = _license_texts(license_dir) + _copyright_texts(doc_dir)
    if use_metadata:
        texts += _metadata_texts()
    seen = {s.lower() for s in bundled_sentences()}
    docs: list[tuple[str, ...]] = []
    for text in texts:
        current: list[str] = []
        words = 0
        for para in re.split(r"\n\s*\n", text):
            for sent in _sentences_of(para):
                if sent.lower() not in seen:
                    seen.add(sent.lower())
                    current.append(sent)
                    words += len(sent.split())
            if words >= _DOC_WORDS:  # documents end only at paragraph breaks
                docs.append(tuple(current))
                current, words = [], 0
        if current:
            docs.append(tuple(current))
    return tuple(docs)


def _documents() -> tuple[tuple[str, ...], ...]:
    return _collect(_LICENSE_DIR, _DOC_DIR, _USE_METADATA)


def other_source_sentences(n: int | None = None) -> list[str]:
    """Clean, unique English sentences from sources other than the Python documentation.

    Args:
        n: how many to return (the first ``n`` of the deterministic order); all if ``None``.

    Returns:
        Sentences sorted by a hash of their text, so that any prefix is a mix of all the
        sources. None of them is in :func:`tensorfold.pretrained.bundled.bundled_sentences`.

    Raises:
        ValueError: ``n`` is negative or larger than the number of sentences found.

    Example:
        >>> few = other_source_sentences(3)
        >>> len(few), few == other_source_sentences()[:3]
        (3, True)
    """
    pool = sorted((s for doc in _documents() for s in doc), key=_sha1)
    if n is None:
        return pool
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(pool):
        raise ValueError(
            f"n={n!r}, but it must be an int from 0 to {len(pool)} "
            "(the number of other-source sentences found on this machine)"
        )
    return pool[:n]


def other_source_documents() -> list[str]:
    """Longer passages of the same text, for perplexity evaluation of causal language models.

    Each passage joins the kept sentences of consecutive paragraphs of one source text, in
    their original order, until it holds at least 150 words (the last passage of a text may be
    shorter). Together the passages hold every sentence of :func:`other_source_sentences`
    exactly once.

    Returns:
        Passages sorted by a hash of their text.

    Example:
        >>> docs = other_source_documents()
        >>> words = sum(len(s.split()) for s in other_source_sentences())
        >>> sum(len(d.split()) for d in docs) == words
        True
    """
    return sorted((" ".join(doc) for doc in _documents()), key=_sha1)
