"""CP-ALS: exact recovery, column normalisation, comparison with tensorly's parafac."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _decompose_helpers import F64, cp_dense, gen, random_cp, rel_err

from tensorfold.decompose import cp_als
from tensorfold.errors import DecompositionError, RankError


@pytest.mark.parametrize(
    ("shape", "rank"), [((5, 6, 7), 3), ((4, 4, 4, 4), 4), ((2, 3, 2, 3, 2, 2), 3)]
)
def test_cp_exact_recovery(shape, rank):
    t = random_cp(shape, rank, seed=11)
    weights, factors, err = cp_als(t, rank)
    assert err < 1e-3
    assert rel_err(t, cp_dense(weights, factors)) == pytest.approx(err, rel=1e-6, abs=1e-12)


def test_cp_exact_recovery_single_start():
    t = random_cp((5, 6, 7), 3, seed=12)
    _, _, err = cp_als(t, 3, n_starts=1)
    assert err < 1e-3


def test_cp_factors_unit_norm_and_weights_sorted():
    t = torch.randn(4, 5, 6, generator=gen(0), dtype=F64)
    weights, factors, _ = cp_als(t, 8)  # rank above every mode size
    assert tuple(weights.shape) == (8,)
    for f, d in zip(factors, (4, 5, 6), strict=True):
        assert tuple(f.shape) == (d, 8)
        torch.testing.assert_close(torch.linalg.vector_norm(f, dim=0), torch.ones(8, dtype=F64))
    assert bool((weights[:-1] >= weights[1:]).all())


def test_cp_more_sweeps_do_not_hurt():
    t = torch.randn(4, 5, 6, generator=gen(1), dtype=F64)
    _, _, err_short = cp_als(t, 5, n_iter_max=5, n_starts=1)
    _, _, err_long = cp_als(t, 5, n_iter_max=60, n_starts=1)
    assert err_long <= err_short + 1e-12


def test_cp_random_init():
    t = random_cp((5, 6, 7), 2, seed=3)
    _, _, err = cp_als(t, 2, init="random", generator=gen(4))
    assert err < 1e-3


def test_cp_vector_and_matrix():
    _, factors, err = cp_als(torch.randn(7, dtype=F64), 2)
    assert [tuple(f.shape) for f in factors] == [(7, 2)] and err < 1e-9
    m = torch.randn(6, 2, dtype=F64) @ torch.randn(2, 5, dtype=F64)
    _, _, err = cp_als(m, 2)
    assert err < 1e-6


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_cp_rank_validation(rank):
    with pytest.raises(RankError, match="rank"):
        cp_als(torch.randn(3, 4, 5), rank)


def test_cp_bad_init():
    with pytest.raises(DecompositionError, match="init"):
        cp_als(torch.randn(3, 4, 5), 2, init="nope")


CASES = [
    ((4, 5, 6), 3, "random"),
    ((4, 5, 6), 5, "lowrank"),
    ((4, 5, 6), 8, "random"),
    ((4, 5, 6), 10, "lowrank"),
    ((4, 4, 4, 4), 3, "lowrank"),
    ((4, 4, 4, 4), 5, "random"),
    ((4, 4, 4, 4), 8, "lowrank"),
    ((4, 4, 4, 4), 10, "random"),
]


@pytest.mark.parametrize(("shape", "rank", "kind"), CASES)
def test_cp_no_worse_than_tensorly(shape, rank, kind):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    if kind == "random":
        t = torch.randn(shape, generator=gen(rank), dtype=F64)
    else:
        t = random_cp(shape, rank, seed=rank)
    _, _, err = cp_als(t, rank)
    cp = parafac(tl.tensor(t.numpy()), rank, init="svd", random_state=0)
    err_tl = float(np.linalg.norm(tl.cp_to_tensor(cp) - t.numpy()) / np.linalg.norm(t.numpy()))
    assert err <= err_tl * (1 + 1e-6) + 1e-12
