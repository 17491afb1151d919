"""Tucker HOSVD/HOOI: exactness, orthonormal padding, comparison with tensorly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _decompose_helpers import F64, gen, random_tucker, rel_err, tucker_dense

from tensorfold.decompose import tucker_hooi
from tensorfold.errors import DecompositionError, RankError


def _assert_orthonormal(f):
    torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype))


@pytest.mark.parametrize(
    ("shape", "true_ranks", "ranks"),
    [
        ((5, 6, 7), (2, 3, 4), (2, 3, 4)),
        ((5, 6, 7), (2, 3, 4), (3, 3, 5)),
        ((4, 3, 5, 4), (2, 2, 3, 2), (2, 2, 3, 2)),
    ],
)
def test_tucker_exact_when_representable(shape, true_ranks, ranks):
    t = random_tucker(shape, true_ranks, seed=5)
    core, factors, err = tucker_hooi(t, ranks)
    assert tuple(core.shape) == ranks
    assert [tuple(f.shape) for f in factors] == [(d, r) for d, r in zip(shape, ranks, strict=True)]
    assert err < 1e-10
    assert rel_err(t, tucker_dense(core, factors)) < 1e-10
    for f in factors:
        _assert_orthonormal(f)


def test_tucker_orthonormal_completion_when_unfolding_is_short():
    # The mode-2 unfolding is 8 x 6: at most 6 directions, 7 requested.
    t = torch.randn(2, 3, 8, generator=gen(1), dtype=F64)
    core, factors, err = tucker_hooi(t, (2, 3, 7))
    assert tuple(core.shape) == (2, 3, 7)
    assert err < 1e-12
    for f in factors:
        _assert_orthonormal(f)
    assert float(core[:, :, 6:].abs().max()) == 0.0  # the padding adds exactly nothing


def test_tucker_hooi_improves_on_hosvd():
    t = torch.randn(6, 7, 8, generator=gen(2), dtype=F64)
    _, _, err_hosvd = tucker_hooi(t, (3, 3, 3), n_iter_max=0)
    _, _, err_hooi = tucker_hooi(t, (3, 3, 3))
    assert err_hooi <= err_hosvd + 1e-12


def test_tucker_random_init_reaches_the_same_fit():
    t = random_tucker((5, 6, 7), (2, 3, 2), seed=3) + 1e-3 * torch.randn(
        5, 6, 7, generator=gen(9), dtype=F64
    )
    _, _, err_svd = tucker_hooi(t, (2, 3, 2))
    _, _, err_rand = tucker_hooi(t, (2, 3, 2), init="random")
    assert err_rand == pytest.approx(err_svd, rel=1e-6)


@pytest.mark.parametrize("ranks", [(6, 2, 2), (0, 2, 2), (2, 2)])
def test_tucker_rank_validation(ranks):
    with pytest.raises(RankError, match="ranks"):
        tucker_hooi(torch.randn(5, 6, 7), ranks)


def test_tucker_bad_init():
    with pytest.raises(DecompositionError, match="init"):
        tucker_hooi(torch.randn(5, 6, 7), (2, 2, 2), init="nope")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("shape", "ranks"), [((5, 6, 7), (2, 3, 4)), ((4, 4, 4, 4), (2, 3, 2, 3))])
def test_tucker_no_worse_than_tensorly(shape, ranks, seed):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tucker

    t = torch.randn(shape, generator=gen(seed), dtype=F64)
    _, _, err = tucker_hooi(t, ranks)
    ref = tl.tucker_to_tensor(tucker(t.numpy(), list(ranks), init="svd"))
    err_tl = float(np.linalg.norm(ref - t.numpy()) / np.linalg.norm(t.numpy()))
    assert err <= err_tl * (1 + 1e-6)
