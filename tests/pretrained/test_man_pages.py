"""Man-page prose: roff markup stripped, examples dropped, a fixed order."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tensorfold.pretrained import man_pages

PAGE = r""".TH DEMO 1
.SH DESCRIPTION
The \fBdemo\fR program reads every file named on its command line and prints a summary.
.nf
demo \-\-all file.txt
.fi
.B It never changes the files that it reads, and it exits with status zero.
"""


def test_roff_to_text_keeps_prose_and_drops_examples() -> None:
    text = man_pages.roff_to_text(PAGE)
    assert "The demo program reads every file named on its command line" in text
    assert "It never changes the files that it reads" in text
    assert "--all" not in text and ".SH" not in text


def test_man_documents_reads_pages_in_a_fixed_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "man1").mkdir()
    for name in ("a", "b"):
        with gzip.open(tmp_path / "man1" / f"{name}.1.gz", "wt") as fh:
            fh.write(PAGE.replace("demo", name))
    monkeypatch.setattr(man_pages, "MAN_DIR", tmp_path)
    docs, pages = man_pages.man_documents(10_000, set())
    assert pages == 2 and len(docs) == 2
    again, _ = man_pages.man_documents(10_000, set())
    assert docs == again
    assert all("prints a summary." in d for d in docs)
    seen = {"the a program reads every file named on its command line and prints a summary."}
    docs, _ = man_pages.man_documents(10_000, seen)
    assert not any("The a program" in d for d in docs)
