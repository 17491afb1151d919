"""The whitened fitting problem: consuming the statistics in place changes no result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorfold.convert.core as core_mod
from tensorfold import tensorize
from tensorfold.convert.calibrate import LayerStats
from tensorfold.convert.fit import whitened_problem


def _stats(n_in: int, same: bool, indefinite: bool = False) -> LayerStats:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * n_in, n_in, generator=g, dtype=torch.float64)
    cov = x.T @ x
    if indefinite:  # a negative direction the default ridge does not lift: damped harder
        cov = torch.eye(n_in, dtype=torch.float64)
        cov[-1, -1] = -0.05
    cross = cov if same else cov + 0.1 * torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    return LayerStats(cov, cross, 3 * n_in)


@pytest.mark.parametrize(
    "same, indefinite", [(False, False), (True, False), (True, True), (False, True)]
)
def test_consumed_statistics_give_the_copied_problem(same: bool, indefinite: bool) -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    kept = _stats(7, same, indefinite)
    before = (kept.cov.clone(), kept.cross.clone())
    ref = whitened_problem(w, kept)
    assert torch.equal(kept.cov, before[0]) and torch.equal(kept.cross, before[1])

    used = _stats(7, same, indefinite)
    got = whitened_problem(w, used, consume=True)
    torch.testing.assert_close(got.chol, ref.chol, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.target, ref.target, rtol=1e-12, atol=1e-12)
    # No copy was made: the statistics themselves were damped (overwritten).
    assert not torch.equal(used.cov, before[0])


class Block(nn.Module):
    """Query/key/value-like layers reading one tensor, then an output layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.q(x) + self.k(x) * self.v(x)))


class Stack(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


@pytest.mark.parametrize("sequential", [True, False])
def test_tensorize_consuming_statistics_matches_copying(
    sequential: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    teacher = Stack().eval()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]

    def convert() -> nn.Module:
        student = copy.deepcopy(teacher)
        ref = teacher if sequential else None
        tensorize(
            student,
            budget=0.5,
            calibration=calib,
            reference=ref,
            sequential=sequential,
            factorization="lowrank",
            progress=False,
        )
        return student

    consumed = convert()
    real = core_mod.whitened_problem
    monkeypatch.setattr(
        core_mod, "whitened_problem", lambda w, st, consume=False: real(w, st, consume=False)
    )
    copied = convert()
    a, b = consumed.state_dict(), copied.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_last_readers_are_the_last_names_of_each_shared_statistics() -> None:
    s1, s2 = _stats(3, True), _stats(3, False)
    stats = {"q": s1, "k": s1, "v": s1, "out": s2}
    assert core_mod._last_readers(["q", "k", "v", "out", "missing"], stats) == {"v", "out"}
