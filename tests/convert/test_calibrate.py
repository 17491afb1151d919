"""Recording layer inputs and their second moments, against plain float64 sums."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorfold.convert.calibrate import input_groups, record_stats, stats_by_block


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


def gram(xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None) -> torch.Tensor:
    ys = xs if ys is None else ys
    return sum(
        y.reshape(-1, y.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()
        for x, y in zip(xs, ys, strict=True)
    )


def test_layers_reading_one_tensor_share_their_statistics() -> None:
    torch.manual_seed(0)
    m = SharedInput()
    stats = record_stats(m, ["q", "k", "v", "out"], batches())
    assert stats["k"] is stats["q"] and stats["v"] is stats["q"] and stats["out"] is not stats["q"]
    torch.testing.assert_close(stats["q"].cov, gram(batches()), rtol=1e-6, atol=1e-6)


def test_cross_moments_with_the_original_model_running_beside() -> None:
    torch.manual_seed(0)
    orig = SharedInput()
    work = SharedInput()  # other weights: the inputs of "out" differ between the two
    xs = batches()
    ins: dict[str, list[torch.Tensor]] = {"o": [], "c": []}
    h1 = orig.out.register_forward_pre_hook(lambda mod, a: ins["o"].append(a[0]))
    h2 = work.out.register_forward_pre_hook(lambda mod, a: ins["c"].append(a[0]))
    with torch.no_grad():
        for x in xs:
            orig(x), work(x)
    h1.remove(), h2.remove()
    stats = record_stats(work, ["q", "k", "out"], xs, original=orig)
    torch.testing.assert_close(stats["out"].cov, gram(ins["c"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["out"].cross, gram(ins["c"], ins["o"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["k"].cross, gram(xs), rtol=1e-6, atol=1e-6)


class SometimesShared(SharedInput):
    """``k`` reads ``q``'s input on the first call only: statistics cannot be shared."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.out(self.q(x) + self.k(x if self.calls == 1 else 2 * x) * self.v(x))


def test_sharing_falls_back_when_a_layer_reads_another_tensor_later() -> None:
    torch.manual_seed(0)
    m = SometimesShared()
    xs = batches()
    stats = record_stats(m, ["q", "k"], xs)
    assert stats["k"] is not stats["q"]
    torch.testing.assert_close(stats["q"].cov, gram(xs), rtol=1e-6, atol=1e-6)
    # the retry's calls: k read x on the first call of the first attempt only
    doubled = [2 * x for x in xs]
    torch.testing.assert_close(stats["k"].cov, gram(doubled), rtol=1e-6, atol=1e-6)


def test_record_stats_matches_float64_sums_and_groups_shared_inputs() -> None:
    torch.manual_seed(0)
    m = SharedInput()
    xs = batches()
    stats = record_stats(m, ["q", "out"], xs)
    ref = sum(x.reshape(-1, 6).double().T @ x.reshape(-1, 6).double() for x in xs)
    torch.testing.assert_close(stats["q"].cov, ref, rtol=1e-6, atol=1e-6)
    assert stats["q"].tokens == 24
    assert input_groups(m, ["q", "k", "v", "out"], xs[0]) == [["q", "k", "v"], ["out"]]


def test_float32_statistics_for_planning_match_float64() -> None:
    torch.manual_seed(0)
    m = SharedInput()
    xs = batches()
    low = record_stats(m, ["q", "out"], xs, dtype=torch.float32)
    assert low["q"].cov.dtype == torch.float32
    torch.testing.assert_close(low["q"].cov.double(), gram(xs), rtol=1e-5, atol=1e-5)


def test_stats_by_block_equal_all_layers_at_once() -> None:
    from .test_convert import Tiny, calib

    torch.manual_seed(0)
    m = Tiny(n=4)
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    data = calib(3)
    whole = record_stats(m, names, data, dtype=torch.float32)
    seen: list[str] = []
    for chunk, stats in stats_by_block(m, names, data):
        assert len({block_of(n) for n in chunk}) == 1  # one block (or the rest) at a time
        seen += chunk
        for n in chunk:
            if n not in whole:  # never ran
                assert n not in stats
                continue
            assert torch.equal(stats[n].cov, whole[n].cov), n
            assert stats[n].tokens == whole[n].tokens
    # Block by block, then the layers outside the stack.
    assert seen == [n for n in names if n.startswith("blocks.")] + ["inp", "unused"]
    assert "unused" not in whole


def block_of(name: str) -> str:
    return name.split(".")[1] if name.startswith("blocks.") else "rest"


def test_pack_stats_round_trip_keeps_sharing_and_cross() -> None:
    from tensorfold.convert.calibrate import LayerStats, pack_stats, unpack_stats

    a = LayerStats(torch.randn(3, 3), torch.randn(3, 3), 7)
    b = LayerStats(torch.randn(2, 2), torch.empty(0), 5)
    b.cross = b.cov  # no original model: one tensor
    back = unpack_stats(pack_stats({"q": a, "k": a, "o": b}))
    assert back["q"] is back["k"] and back["o"].cross is back["o"].cov
    assert torch.equal(back["q"].cov, a.cov) and torch.equal(back["q"].cross, a.cross)
    assert (back["q"].tokens, back["o"].tokens) == (7, 5)


def test_auto_plan_records_planning_statistics_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorfold.convert import plan
    from tensorfold.convert import planner as planner_mod
    from tensorfold.convert.spill_cache import SpillCache

    from .test_convert import Tiny, calib

    passes: list[int] = []
    real = planner_mod.stats_by_block

    def counted(*args: object, **kw: object) -> object:
        passes.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(planner_mod, "stats_by_block", counted)
    torch.manual_seed(0)
    m = Tiny(n=3)
    plan(m, budget=0.4, calibration=calib(3), factorization="auto")  # one candidate
    assert len(passes) == 1
    passes.clear()
    both = ("lowrank", "tucker")
    kept = plan(m, budget=0.4, calibration=calib(3), factorization="auto", candidates=both)
    assert len(passes) == 1
    # No room on disk: the second pass records again, and the plan is the same.
    monkeypatch.setattr(SpillCache, "put", lambda self, i, v: False)
    passes.clear()
    again = plan(m, budget=0.4, calibration=calib(3), factorization="auto", candidates=both)
    assert len(passes) == 2
    assert [(lp.name, lp.factorization, lp.rank) for lp in kept.layers] == [
        (lp.name, lp.factorization, lp.rank) for lp in again.layers
    ]
    assert [lp.candidates for lp in kept.layers] == [lp.candidates for lp in again.layers]
