"""Real English sentences assembled offline, for calibration and evaluation.

The text comes from documentation that ships with every CPython install: the language
reference topics in :mod:`pydoc_data.topics` and the docstrings of a fixed list of standard-library
modules, their classes, functions and methods (about 5,600 sentences on CPython 3.11). Nothing
is downloaded. Sentences are cleaned (code, markup and tables dropped), deduplicated and split
deterministically into disjoint calibration and evaluation sets.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["english_sentences", "calibration_and_evaluation_sentences", "training_sentences"]

# Standard-library modules with prose docstrings; importing them has no side effects.
_STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bdb",
    "bisect",
    "cProfile",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "compileall",
    "concurrent.futures",
    "concurrent.futures.process",
    "concurrent.futures.thread",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "email.headerregistry",
    "email.message",
    "email.mime.text",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib",
    "importlib.metadata",
    "importlib.resources",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "logging.config",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "multiprocessing.managers",
    "multiprocessing.pool",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.error",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "venv",
    "warnings",
    "weakref",
    "wsgiref.handlers",
    "wsgiref.simple_server",
    "wsgiref.util",
    "xml.dom.minidom",
    "xml.dom.pulldom",
    "xml.etree.ElementTree",
    "xml.sax",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipapp",
    "zipfile",
    "zipimport",
    "zlib",
    "zoneinfo",
)

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_HINTS = re.compile(r"(>>>|::|\{|\}|==|\[|\]|\\|__|\w\(|\w\.\w+\(|->|=|\*\*|`|\|)")
_WORD = re.compile(r"[A-Za-z][a-z]+")


def _clean(text: str) -> list[str]:
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "*", "-", "+", "|", "=")) for ln in lines):
            continue
        flat = " ".join(ln for ln in lines if ln)
        for sent in _SPLIT.split(flat):
            sent = sent.strip()
            words = sent.split()
            if not 8 <= len(words) <= 40 or not sent[0].isupper() or sent[-1] not in ".!?":
                continue
            if _CODE_HINTS.search(sent):
                continue
            if len(_WORD.findall(sent)) < 0.75 * len(words):
                continue
            out.append(sent)
    return out


_DESCRIPTORS = (property, classmethod, staticmethod)


def gzip_file_sentences(
    paths: Iterable[Path], to_text: Callable[[str], str], max_words: int, excluded: set[str]
) -> list[list[str]]:
    """The clean sentences of each gzip-compressed text file, one list per file that keeps
    any, read in a fixed order (by a hash of the file name) until about ``max_words`` words.

    ``to_text`` turns a file's contents into prose paragraphs; sentences in ``excluded``
    (lower case) are skipped and every kept one is added to it, so the result holds each
    sentence once. A file that cannot be read is skipped.
    """
    files = sorted(paths, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    kept_by_file: list[list[str]] = []
    total = 0
    for path in files:
        if total >= max_words:
            break
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                source = fh.read()
        except (OSError, EOFError):
            continue
        kept = []
        for sent in _clean(to_text(source)):
            if sent.lower() not in excluded:
                excluded.add(sent.lower())
                kept.append(sent)
        if kept:
            kept_by_file.append(kept)
            total += sum(len(s.split()) for s in kept)
    return kept_by_file


def _docstrings(mod: object) -> list[str]:
    """The module's docstring and those of its own classes, functions and methods."""
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != getattr(mod, "__name__", None):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member) or isinstance(member, _DESCRIPTORS):
                    docs.append(inspect.getdoc(member) or "")
    return docs


def english_sentences() -> list[str]:
    """Every cleaned, unique English sentence found in the bundled Python documentation.

    Returns:
        Sentences in a deterministic order (sorted by a hash of their text).
    """
    texts: list[str] = []
    try:
        from pydoc_data.topics import topics

        texts.extend(topics[k] for k in sorted(topics))
    except ImportError:  # pragma: no cover - pydoc_data is part of CPython
        pass
    for name in _STDLIB_MODULES:
        try:
            with warnings.catch_warnings():  # some modules warn that they are deprecated
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - optional stdlib parts (e.g. no _ssl)
            continue
        texts.extend(_docstrings(mod))
    seen: set[str] = set()
    sentences: list[str] = []
    for text in texts:
        for sent in _clean(text):
            key = sent.lower()
            if key not in seen:
                seen.add(key)
                sentences.append(sent)
    sentences.sort(key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return sentences


def calibration_and_evaluation_sentences(
    n_calibration: int = 512, n_evaluation: int = 512
) -> tuple[list[str], list[str]]:
    """Two disjoint sets of English sentences.

    Args:
        n_calibration: number of calibration sentences.
        n_evaluation: number of evaluation sentences (taken from a different part of the pool).

    Returns:
        ``(calibration, evaluation)``; no sentence appears in both.

    Example:
        >>> cal, ev = calibration_and_evaluation_sentences(8, 8)
        >>> len(cal), len(ev), bool(set(cal) & set(ev))
        (8, 8, False)
    """
    pool = english_sentences()
    if n_calibration + n_evaluation > len(pool):
        raise ValueError(
            f"n_calibration + n_evaluation = {n_calibration + n_evaluation}, but only "
            f"{len(pool)} distinct sentences are available offline"
        )
    return pool[:n_calibration], pool[len(pool) - n_evaluation :]


def training_sentences(n_evaluation: int = 512, n_training: int | None = None) -> list[str]:
    """Sentences for calibration and distillation: every sentence of the pool that is not
    one of the ``n_evaluation`` evaluation sentences of
    :func:`calibration_and_evaluation_sentences` (the first ``n_training`` of them if given).
    The calibration sentences are its first ones."""
    pool = english_sentences()
    if n_evaluation >= len(pool):
        raise ValueError(
            f"n_evaluation={n_evaluation}, but only {len(pool)} sentences are available"
        )
    train = pool[: len(pool) - n_evaluation]
    return train if n_training is None else train[:n_training]
