"""Other-source English text: determinism, disjointness from the Python-docs corpus, cleaning,
the parsing of each source on small files made here, and the fallback when sources are missing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from pathlib import Path

import pytest

from tensorfold.pretrained import other_text
from tensorfold.pretrained.bundled import bundled_sentences
from tensorfold.pretrained.corpus import english_sentences
from tensorfold.pretrained.other_text import other_source_documents, other_source_sentences

ALPHA = re.compile(r"^[(\"“]?[A-Za-z][A-Za-z'’-]*[,.;:!?\"”)]*$")

# Three plain sentences of ten words each, for the files made below.
S1 = "The quiet river carried small boats past the old mill."
S2 = "Every morning the baker opened his shop before the sun."
S3 = "Children played in the square while their parents talked nearby."
S4 = "A gentle wind moved through the tall grass of summer."
WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()


def _isolated(monkeypatch: pytest.MonkeyPatch, licenses: Path, docs: Path, meta: bool) -> None:
    monkeypatch.setattr(other_text, "_LICENSE_DIR", str(licenses))
    monkeypatch.setattr(other_text, "_DOC_DIR", str(docs))
    monkeypatch.setattr(other_text, "_USE_METADATA", meta)


# ---- the real sources of this machine ----


def test_deterministic_sorted_by_hash_and_prefixes() -> None:
    pool = other_source_sentences()
    assert pool == other_source_sentences()
    assert pool == sorted(pool, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    assert other_source_sentences(10) == pool[:10]
    assert other_source_sentences(0) == []
    assert other_source_documents() == other_source_documents()


def test_disjoint_from_the_default_text_and_unique() -> None:
    pool = other_source_sentences()
    assert pool, "no other-source sentence found"
    lowered = [s.lower() for s in pool]
    assert len(set(lowered)) == len(lowered)
    assert not set(lowered) & {s.lower() for s in english_sentences()}
    assert not set(lowered) & {s.lower() for s in bundled_sentences()}  # man pages, info


def test_english_looking_and_clean() -> None:
    for sent in other_source_sentences():
        words = sent.split()
        assert 8 <= len(words) <= 40, sent
        assert sent[0].isupper() and sent[-1] in ".!?", sent
        alphabetic = sum(bool(ALPHA.match(w)) for w in words)
        assert alphabetic >= 0.75 * len(words), sent
        assert not re.search(r"@|https?:|/|<|>|`|\{|\}|==|\t|©", sent), sent


@pytest.mark.skipif(
    not (Path("/usr/share/common-licenses/GPL-3").is_file() and Path("/usr/share/doc").is_dir()),
    reason="needs Debian's license texts and package copyright files",
)
def test_counts_on_a_debian_machine() -> None:
    pool = other_source_sentences()
    assert len(pool) >= 2000
    # GPL-3 section 9, wrapped over two lines in the file.
    assert (
        "You are not required to accept this License in order to receive or run a copy "
        "of the Program." in pool
    )


def test_documents_hold_every_sentence_once() -> None:
    docs = other_source_documents()
    pool = other_source_sentences()
    assert sum(len(d.split()) for d in docs) == sum(len(s.split()) for s in pool)
    text = "\n".join(docs)
    for sent in pool:
        assert text.count(sent) >= 1, sent
    assert max(len(d.split()) for d in docs) >= 150


# ---- each source, on files made here ----


def test_license_folder_cleaning_and_symlinks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lic = tmp_path / "licenses"
    lic.mkdir()
    pydoc = next(s for s in english_sentences() if list(other_text._sentences_of(s)) == [s])
    (lic / "A").write_text(
        f"{S1}\n{S2}\n\n"  # one paragraph, wrapped
        "    >>> print('code')\n    Code paragraphs are dropped entirely here.\n\n"
        "Mail the author at someone@example.org for any questions you have.\n\n"
        "Copyright 2004 by the members of the small village committee.\n\n"
        f"{pydoc}\n\n"
        "Too short.\n"
    )
    (lic / "B").symlink_to(lic / "A")  # read once
    (lic / "C").write_text(f"{S2.upper()[0]}{S2[1:]}\n\n{S3}\n")  # S2 again: kept once
    _isolated(monkeypatch, lic, tmp_path / "none", meta=False)
    expected = sorted([S1, S2, S3], key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    assert other_source_sentences() == expected
    assert sorted(other_source_documents()) == sorted([f"{S1} {S2}", S3])


def test_dep5_copyright_keeps_license_bodies_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = tmp_path / "doc"
    (docs / "pkg").mkdir(parents=True)
    (docs / "pkg" / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: pkg\n\n"
        "Files: *\n"
        "Copyright: The many friends of the little project team and others.\n"
        "License: custom\n"
        f" {S1}\n"
        " .\n"
        f" {S2}\n\n"
        "Files: debian/*\n"
        "Copyright: Someone Else who maintains the package for the distribution.\n"
        "License: custom\n\n"
        "Comment: " + S3 + "\n"
    )
    (docs / "free").mkdir()
    (docs / "free" / "copyright").write_text(f"This package was written by hand.\n\n{S4}\n")
    (docs / "notes").mkdir()  # no copyright file: skipped
    _isolated(monkeypatch, tmp_path / "none", docs, meta=False)
    assert set(other_source_sentences()) == {S1, S2, S3, S4}
    # The DEP-5 file's kept paragraphs form one document, the free-form file another.
    assert sorted(other_source_documents()) == sorted([f"{S1} {S2} {S3}", S4])


def test_metadata_descriptions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def dist(folder: str, name: str, body: str) -> None:
        info = tmp_path / f"{folder}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n{body}"
        )

    dist(
        "alpha-1.0",
        "Alpha",
        "# Alpha\n\n"
        "```python\nThis line is inside a code block and must never be kept.\n```\n\n"
        "The [quiet river](https://example.org/river) carried small boats past "
        "the **old** mill.\n",
    )
    dist("alpha_dup-1.0", "alpha", f"{S4}\n")  # same normalised name: one of the two is read
    dist("tensorfold-0.1", "tensorfold", f"{S2}\n")  # our own README is never used
    dist("beta-2.0", "Beta", f"{S3}\n")
    found = list(importlib.metadata.distributions(path=[str(tmp_path)]))
    monkeypatch.setattr(other_text.importlib.metadata, "distributions", lambda: found)
    _isolated(monkeypatch, tmp_path / "none", tmp_path / "none", meta=True)
    pool = other_source_sentences()
    assert set(pool) in ({S1, S3}, {S4, S3})  # never S2, never the code block


def test_long_texts_split_into_documents_at_paragraphs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lic = tmp_path / "licenses"
    lic.mkdir()
    sents = [f"Sentence number {w} of this long text is plain and ordinary." for w in WORDS[:12]]
    paragraphs = ["\n".join(sents[i : i + 4]) for i in range(0, len(sents), 4)]
    (lic / "long").write_text("\n\n".join(paragraphs) + "\n")
    monkeypatch.setattr(other_text, "_DOC_WORDS", 50)
    _isolated(monkeypatch, lic, tmp_path / "none", meta=False)
    docs = other_source_documents()
    # 40 words per paragraph: two paragraphs make a document of 80 words (>= 50).
    assert sorted(docs) == sorted(" ".join(sents[i : i + 8]) for i in range(0, len(sents), 8))


def test_missing_sources_fall_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _isolated(monkeypatch, tmp_path / "none", tmp_path / "none", meta=False)
    assert other_source_sentences() == []
    assert other_source_documents() == []
    with pytest.raises(ValueError, match=r"n=1, but it must be an int from 0 to 0"):
        other_source_sentences(1)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_bad_n(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^n=.*, but it must be an int from 0 to \d+"):
        other_source_sentences(bad)  # type: ignore[arg-type]


def test_n_above_the_pool() -> None:
    size = len(other_source_sentences())
    with pytest.raises(ValueError, match=rf"n={size + 1}, but it must be an int from 0 to {size}"):
        other_source_sentences(size + 1)
