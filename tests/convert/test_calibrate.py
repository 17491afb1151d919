"""Recording layer inputs and their second moments, against plain float64 sums."""

from __future__ import annotations

import torch
from torch import nn

from tensorfold.convert.calibrate import input_groups, record_inputs, record_stats


class SharedInput(nn.Module):
    """Three layers reading one tensor (like query/key/value), then one reading their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q(x) + self.k(x) * self.v(x))


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 6, generator=g) for _ in range(n)]


def test_record_inputs_stores_a_shared_input_once() -> None:
    torch.manual_seed(0)
    m = SharedInput()
    names = ["q", "k", "v", "out"]
    kept = record_inputs(m, names, batches())
    assert kept is not None
    for b, x in enumerate(batches()):
        assert torch.equal(kept["q"][b], x.reshape(-1, 6))
        assert kept["k"][b] is kept["q"][b] and kept["v"][b] is kept["q"][b]
        assert kept["out"][b].shape == (8, 5)
    assert record_inputs(m, names, batches(), limit_bytes=100) is None  # over the limit: nothing


def test_record_stats_matches_float64_sums_and_groups_shared_inputs() -> None:
    torch.manual_seed(0)
    m = SharedInput()
    xs = batches()
    stats = record_stats(m, ["q", "out"], xs)
    ref = sum(x.reshape(-1, 6).double().T @ x.reshape(-1, 6).double() for x in xs)
    torch.testing.assert_close(stats["q"].cov, ref, rtol=1e-6, atol=1e-6)
    assert stats["q"].tokens == 24
    assert input_groups(m, ["q", "k", "v", "out"], xs[0]) == [["q", "k", "v"], ["out"]]
