"""The gauge-fixed low-rank format: its count, exactness and what fitting writes."""

import math

import pytest
import torch
from reference import dense_weight

from tensorfold.convert.planner import _allocate
from tensorfold.errors import RankError
from tensorfold.formats import get_format
from tensorfold.formats.lowrank import (
    builds_v,
    gauge_count,
    gauge_fixed,
    next_rank_on_grid,
    rank_on_grid,
)
from tensorfold.nn import FactorizedLinear

LowRank = get_format("lowrank")


def test_count_is_degrees_of_freedom_of_a_rank_k_matrix():
    t = LowRank((48,), (64,), rank=10)
    assert t.num_parameters() == 10 * (48 + 64 - 10) == gauge_count(10, 48, 64)
    # The same count in a plain pair holds a smaller rank.
    pair = get_format("tt")((48,), (64,), rank=0.5)
    gauge = LowRank((48,), (64,), rank=0.5)
    assert gauge.num_parameters() <= 0.5 * 48 * 64
    assert gauge.rank > pair.rank[0]
    assert gauge.rank == max(k for k in range(1, 49) if gauge_count(k, 48, 64) <= 1536)


def test_full_rank_holds_the_dense_count_and_recovers_any_matrix():
    t = LowRank((48,), (64,), rank="same")
    assert t.rank == 48 and t.num_parameters() == 48 * 64
    dense = torch.randn(48, 64, dtype=torch.float64)
    assert t.fit_(dense) < 1e-6
    torch.testing.assert_close(t.to_matrix().double(), dense, atol=1e-5, rtol=0)


def test_fit_matches_truncated_svd_in_float64():
    torch.manual_seed(0)
    dense = torch.randn(2, 20, 30, dtype=torch.float64)
    t = LowRank((20,), (30,), rank=6, layer_shape=(2,), dtype=torch.float64)
    t.fit_(dense)
    for i in range(2):
        u, s, vh = torch.linalg.svd(dense[i])
        best = (u[:, :6] * s[:6]) @ vh[:6]
        torch.testing.assert_close(t.to_matrix((i,)), best, atol=1e-10, rtol=0)


@pytest.mark.parametrize("m", [3, 7])
def test_gauge_fixed_is_exact_and_has_identity_columns(m):
    torch.manual_seed(1)
    left, right = torch.randn(12, m, dtype=torch.float64), torch.randn(m, 16, dtype=torch.float64)
    u, coef, perm = gauge_fixed(left, right, 7)
    v = torch.cat([torch.eye(7, dtype=torch.float64), coef], 1)[:, torch.argsort(perm)]
    torch.testing.assert_close(u @ v, left @ right, atol=1e-10, rtol=0)
    # The pivot columns of V are the identity's, and the pivoting keeps the rest bounded.
    assert torch.equal(v[:, perm[:7]], torch.eye(7, dtype=v.dtype))
    assert sorted(perm.tolist()) == list(range(16))
    assert coef.abs().max() < 10


def test_assign_low_rank_writes_the_matrix_and_pads_a_smaller_one():
    t = LowRank((4, 3), (2, 8), rank=5)
    left, right = torch.randn(12, 3), torch.randn(3, 16)
    assert t.assign_low_rank_(left, right)
    torch.testing.assert_close(t.to_matrix(), left @ right, atol=1e-5, rtol=1e-5)
    assert not t.assign_low_rank_(torch.randn(12, 6), torch.randn(6, 16))  # over capacity


def test_rank_grid_steps_by_8_from_64_and_by_16_from_128():
    assert [rank_on_grid(k) for k in (20, 63, 64, 71, 79, 127, 128, 143, 300)] == [
        20, 63, 64, 64, 72, 120, 128, 128, 288,
    ]  # fmt: skip
    assert [next_rank_on_grid(k) for k in (0, 62, 63, 64, 120, 128)] == [1, 63, 64, 72, 128, 144]


def test_ranks_from_counts_take_steps_of_the_grid():
    # The largest rank on the grid within the count.
    t = LowRank((384,), (512,), rank=0.3)
    best = max(k for k in range(1, 385) if gauge_count(k, 384, 512) <= 0.3 * 384 * 512)
    assert best == 71 and t.rank == 64
    # Full rank is always allowed; small ranks keep every value.
    assert LowRank((300,), (400,), rank="same").rank == 300
    assert LowRank((48,), (64,), rank=0.5).rank == max(
        k for k in range(1, 49) if gauge_count(k, 48, 64) <= 1536
    )
    # An explicit rank is the rank.
    assert LowRank((384,), (512,), rank=101).rank == 101


@pytest.mark.parametrize("shape", [(1, 24), (3, 7, 24)])
def test_layer_forward_and_gradients_match_dense_float64(shape):
    torch.manual_seed(2)
    layer = FactorizedLinear(24, 16, factorization="lowrank", rank=5, dtype=torch.float64)
    # One row gathers the input, 21 rows build V: both forms are checked.
    rows = math.prod(shape[:-1])
    assert builds_v(rows, 5, 24) == (rows > 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = layer.weight.to_matrix()
    ref = x @ w.T + layer.bias
    y = layer(x)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(y)
    gx, gu, gc = torch.autograd.grad(y, (x, *layer.weight.factors), grad)
    u, c = layer.weight.factors
    order = torch.argsort(layer.weight.perm)

    def dense(u, c):
        v = torch.cat([torch.eye(5, dtype=c.dtype), c], 1)[:, order]
        return x @ (u @ v).T

    ru, rc = torch.autograd.grad(dense(u, c), (u, c), grad)
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gc, rc)
    torch.testing.assert_close(gx, grad.reshape(-1, 16).matmul(w).reshape(x.shape))


def test_state_dict_carries_the_permutation():
    a = LowRank((12,), (16,), rank=4)
    a.fit_(torch.randn(12, 16))
    assert a.perm.tolist() != list(range(16))
    b = LowRank((12,), (16,), rank=4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.to_matrix(), a.to_matrix())


def test_int8_storage_keeps_the_permutation_and_is_close():
    t = LowRank((32,), (40,), rank=8)
    t.fit_(torch.randn(32, 40))
    before = t.to_matrix().detach()
    t.quantize_()
    assert t.factors[0].dtype == torch.int8 and t.perm.dtype == torch.int64
    assert float((t.to_matrix() - before).abs().max()) < 0.02 * float(before.abs().max())


def test_default_init_has_linear_scale():
    torch.manual_seed(3)
    layer = FactorizedLinear(512, 256, factorization="lowrank", rank=64)
    target = 1 / math.sqrt(3 * 512)
    assert abs(float(layer.weight.to_matrix().std()) / target - 1) < 0.1


def test_rank_rules():
    assert LowRank((8,), (6,), rank=100).rank == 6
    assert LowRank((8,), (6,), rank=(3,)).rank == 3
    with pytest.raises(RankError, match=r"rank=\(2, 2\): lowrank takes a single int rank"):
        LowRank((8,), (6,), rank=(2, 2))


def test_the_split_policy_keeps_nothing_for_built_factors():
    layer = FactorizedLinear(64, 64, factorization="lowrank", rank=8).eval()
    with torch.no_grad():
        layer(torch.randn(32, 64))
    assert layer.cached_bytes() == 0
    assert "cache" in str(layer.explain(torch.randn(32, 64)))


def test_allocation_with_gauge_costs_spends_the_budget_on_larger_ranks():
    lin = {n: torch.nn.Linear(32, 32) for n in "ab"}
    spectra = {"a": torch.linspace(2, 1, 32) ** 2, "b": torch.linspace(1, 0.5, 32) ** 2}
    weights = dict.fromkeys("ab", 1.0)
    pair = _allocate(lin, spectra, weights, 0.5)
    gauge = _allocate(lin, spectra, weights, 0.5, gauge=True)
    for shares in (pair, gauge):
        assert sum(shares.values()) * 32 * 32 <= 0.5 * 2 * 32 * 32
    rank_pair = {n: round(s * 32 * 32 / 64) for n, s in pair.items()}
    rank_gauge = {
        n: next(k for k in range(33) if gauge_count(k, 32, 32) == round(s * 1024))
        for n, s in gauge.items()
    }
    assert sum(rank_gauge.values()) > sum(rank_pair.values())


def test_allocation_on_wide_layers_takes_rank_steps_within_the_budget():
    lin = {n: torch.nn.Linear(384, 256) for n in "ab"}
    spectra = {"a": torch.linspace(3, 1, 256) ** 2, "b": torch.linspace(1, 0.2, 256) ** 2}
    shares = _allocate(lin, spectra, dict.fromkeys("ab", 1.0), 0.7, gauge=True)
    assert sum(shares.values()) <= 0.7 * 2
    ranks = {n: LowRank((256,), (384,), rank=s).rank for n, s in shares.items()}
    assert all(k >= 128 and k % 16 == 0 for k in ranks.values())
    assert {n: gauge_count(k, 256, 384) / (256 * 384) for n, k in ranks.items()} == shares
    # Spent to within one step of terms.
    assert sum(shares.values()) > 0.7 * 2 - 16 * (256 + 384) / (256 * 384)


@pytest.mark.parametrize("implementation", ["factorized", "auto", "reconstructed"])
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_path_computes_the_reference(implementation, n_layers, checkpointing):
    torch.manual_seed(4)
    layer = FactorizedLinear(
        20, 12, factorization="lowrank", rank=4, n_layers=n_layers, dtype=torch.float64,
        implementation=implementation, checkpointing=checkpointing,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight.fit_(torch.randn(*layer.layer_shape, 12, 20, dtype=torch.float64))
    x = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    idx = n_layers - 1
    w = dense_weight(layer, (idx,) if n_layers > 1 else ())
    bias = layer.bias[idx] if n_layers > 1 else layer.bias
    y = layer(x, idx)
    torch.testing.assert_close(y, x @ w.T + bias)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(gx, (2 * (x @ w.T + bias)) @ w)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, idx), x @ w.T + bias)
    assert (layer.explain(x, idx).path == "format") == (implementation != "reconstructed")


def test_int8_layer_runs_its_own_path_on_the_dequantized_factors():
    layer = FactorizedLinear(40, 32, factorization="lowrank", rank=8)
    layer.weight.fit_(torch.randn(32, 40))
    layer.weight.quantize_()
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.to_matrix().T + layer.bias)


def test_int8_lowrank_model_saves_and_loads_with_its_permutation(tmp_path):
    import tensorfold

    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    batches = [torch.randn(128, 96) for _ in range(2)]
    tensorfold.tensorize(
        net, budget=0.5, factorization="lowrank", calibration=batches, targets="0", progress=False
    )
    tensorfold.quantize_factors(net)
    assert net[0].weight.perm.tolist() != list(range(96))
    tensorfold.save(net, tmp_path / "m.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    tensorfold.load(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh[0].weight.perm, net[0].weight.perm)
    with torch.no_grad():
        assert torch.equal(fresh(batches[0]), net(batches[0]))


def _k_major(u: torch.Tensor, n_layer_modes: int = 0) -> bool:
    """Whether ``U (*layers, *out_modes, k)`` is laid out as ``(*layers, k, *out_modes)``."""
    return u.movedim(-1, n_layer_modes).is_contiguous() and not u.is_contiguous()


@pytest.mark.parametrize("n_layers", [1, 3])
def test_u_is_stored_k_major_through_copies_moves_and_loading(tmp_path, n_layers):
    import copy

    import tensorfold

    layer = FactorizedLinear(64, 48, factorization="lowrank", rank=0.5, n_layers=n_layers)
    n = 0 if n_layers == 1 else 1
    assert _k_major(layer.weight.factors[0], n)
    assert _k_major(copy.deepcopy(layer).weight.factors[0], n)
    assert _k_major(layer.double().weight.factors[0], n)
    fresh = FactorizedLinear(64, 48, factorization="lowrank", rank=0.5, n_layers=n_layers)
    fresh.double().load_state_dict(layer.state_dict())
    assert _k_major(fresh.weight.factors[0], n)
    assert torch.equal(fresh.weight.factors[0], layer.weight.factors[0])
    if n_layers == 1:  # a whole model written and read back, int8 factors too
        net = torch.nn.Sequential(torch.nn.Linear(64, 48))
        tensorfold.tensorize(net, budget=0.5, factorization="lowrank", progress=False)
        tensorfold.quantize_factors(net)
        tensorfold.save(net, tmp_path / "m.safetensors")
        back = torch.nn.Sequential(torch.nn.Linear(64, 48))
        tensorfold.load(tmp_path / "m.safetensors", back)
        assert _k_major(back[0].weight.factors[0]) and _k_major(net[0].weight.factors[0])
        assert _k_major(back[0].weight._stored_values()[0])  # dequantized the same way


def test_one_row_forward_matches_dense_float64_with_k_major_u():
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 80).double()
    layer = FactorizedLinear.from_linear(
        dense, factorization="lowrank", rank="same", implementation="auto"
    ).eval()
    assert _k_major(layer.weight.factors[0])
    x = torch.randn(1, 1, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), atol=1e-10, rtol=0)
