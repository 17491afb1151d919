"""The benchmarks' baselines check their algebra against dense float64 references
(``--check``); run those checks here so that a change to the library they build on cannot
break them unseen."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("module", ["svdllm_baseline", "basis_sharing"])
def test_baseline_self_checks_pass(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        mod = __import__(module)
        assert mod.main(["--check"]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert "checks passed" in capsys.readouterr().out
