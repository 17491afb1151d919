"""Info-manual prose: node headers and menus dropped, licence nodes skipped, a fixed order."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tensorfold.pretrained import bundled, info_pages

MANUAL = (
    "This is demo.info, produced by makeinfo from demo.texi.\n"
    "\x1f\nFile: demo.info,  Node: Top,  Next: Usage,  Up: (dir)\n\n"
    "The demo program reads every file named on its command line and prints a summary.\n\n"
    "* Menu:\n* Usage::     How to run it.\n"
    "\x1f\nFile: demo.info,  Node: Usage,  Prev: Top,  Up: Top\n\n"
    "It never changes the files that it reads, and it exits with status zero.\n"
    "\x1f\nFile: demo.info,  Node: GNU Free Documentation License,  Up: Top\n\n"
    "Everyone is permitted to copy and distribute verbatim copies of this license document.\n"
    "\x1f\nFile: demo.info,  Node: Notes,  Up: Top\n\n"
    "This manual is covered by the GNU General Public License like the program itself.\n"
)


def test_info_sentences_keep_prose_and_skip_headers_menus_and_licences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b"):
        with gzip.open(tmp_path / f"{name}.info.gz", "wt") as fh:
            fh.write(MANUAL.replace("demo", name))
    monkeypatch.setattr(info_pages, "INFO_DIR", tmp_path)
    info_pages._info_sentences.cache_clear()
    try:
        got = info_pages.info_sentences(10_000)
        assert info_pages.info_sentences(10_000) == got
        assert len(got) == 3  # two prose sentences per manual, one of them shared
        assert "It never changes the files that it reads, and it exits with status zero." in got
        assert not any("File:" in s or "Menu" in s or "license" in s.lower() for s in got)
        assert len(info_pages.info_sentences(5)) == 2  # whole manuals: only the first one
    finally:
        info_pages._info_sentences.cache_clear()


def test_bundled_text_holds_each_sentence_once() -> None:
    text = bundled.bundled_sentences()
    assert len({s.lower() for s in text}) == len(text)
    assert len(text) >= 5000
