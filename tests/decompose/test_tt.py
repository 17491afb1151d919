"""TT-SVD and TT-matrix SVD: exactness, padding, comparison with tensorly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _decompose_helpers import F64, gen, random_tt, rel_err, tt_dense

from tensorfold.decompose import tt_svd, ttm_svd
from tensorfold.errors import DecompositionError, RankError


@pytest.mark.parametrize(
    ("shape", "true_ranks", "ranks"),
    [
        ((4, 5, 6), (1, 3, 2, 1), (1, 3, 2, 1)),
        ((3, 4, 5, 2), (1, 2, 3, 2, 1), (1, 3, 5, 2, 1)),
        ((2, 3, 2, 3, 2, 2), (1, 2, 3, 3, 2, 2, 1), (1, 2, 4, 4, 3, 2, 1)),
    ],
)
def test_tt_exact_when_representable(shape, true_ranks, ranks):
    t = random_tt(shape, true_ranks, seed=1)
    cores, err = tt_svd(t, ranks)
    assert [tuple(c.shape) for c in cores] == [
        (ranks[k], shape[k], ranks[k + 1]) for k in range(len(shape))
    ]
    assert err < 1e-10
    assert rel_err(t, tt_dense(cores)) < 1e-10


def test_tt_padding_beyond_what_the_data_supports():
    # Bond 1 can hold at most 2 directions, bond 2 at most 4: ask for more.
    t = torch.randn(2, 3, 4, generator=gen(0), dtype=F64)
    cores, err = tt_svd(t, (1, 5, 7, 1))
    assert [tuple(c.shape) for c in cores] == [(1, 2, 5), (5, 3, 7), (7, 4, 1)]
    assert err < 1e-12
    # Padded bond directions are non-zero in the left core (gradients can flow) ...
    assert bool((torch.linalg.vector_norm(cores[0], dim=(0, 1)) > 0.5).all())
    assert bool((torch.linalg.vector_norm(cores[1], dim=(0, 1)) > 0.5).all())
    # ... yet add nothing: the data-carrying bond directions alone rebuild the tensor,
    assert float(cores[2][4:].abs().max()) == 0.0
    trimmed = [cores[0][:, :, :2], cores[1][:2, :, :4], cores[2][:4]]
    assert rel_err(t, tt_dense(trimmed)) < 1e-12
    assert rel_err(tt_dense(cores), tt_dense(trimmed)) < 1e-12


def test_tt_cores_left_orthonormal():
    t = torch.randn(4, 5, 6, generator=gen(2), dtype=F64)
    cores, _ = tt_svd(t, (1, 3, 4, 1))
    for c in cores[:-1]:
        m = c.reshape(-1, c.shape[-1])
        torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=F64))


@pytest.mark.parametrize(
    "ranks", [(1, 2, 3, 1), (1, 4, 6, 1), (1, 1, 1, 1), (0, 2, 2, 1), (1, 2, 1), (1, 2.5, 2, 1)]
)
def test_tt_rank_validation(ranks):
    t = torch.randn(4, 5, 6)
    if ranks in [(1, 2, 3, 1), (1, 4, 6, 1), (1, 1, 1, 1)]:
        tt_svd(t, ranks)
    else:
        with pytest.raises(RankError, match="ranks"):
            tt_svd(t, ranks)


def test_tt_ends_must_be_one():
    with pytest.raises(RankError, match="start and end with 1"):
        tt_svd(torch.randn(4, 5), (2, 3, 1))


@pytest.mark.parametrize(
    ("n_layer", "layer", "outs", "ins", "ranks"),
    [
        (0, (), (2, 3), (4, 2), (1, 3, 1)),
        (0, (), (2, 3, 2), (3, 1, 2), (1, 2, 3, 1)),
        (1, (3,), (2, 3), (4, 2), (1, 2, 3, 1)),
        (2, (2, 2), (4,), (3,), (1, 2, 2, 1)),
    ],
)
def test_ttm_exact_when_representable(n_layer, layer, outs, ins, ranks):
    g = gen(3)
    cores_true = [
        torch.randn(ranks[k], n, ranks[k + 1], generator=g, dtype=F64) for k, n in enumerate(layer)
    ]
    cores_true += [
        torch.randn(ranks[n_layer + k], o, i, ranks[n_layer + k + 1], generator=g, dtype=F64)
        for k, (o, i) in enumerate(zip(outs, ins, strict=True))
    ]
    t = tt_dense(cores_true)
    assert tuple(t.shape) == layer + outs + ins
    cores, err = ttm_svd(t, n_layer, outs, ins, ranks)
    assert [tuple(c.shape) for c in cores] == [tuple(c.shape) for c in cores_true]
    assert err < 1e-10
    assert rel_err(t, tt_dense(cores)) < 1e-10


def test_ttm_padding_shapes():
    t = torch.randn(2, 3, 4, 2, generator=gen(4), dtype=F64)  # out (2, 3), in (4, 2)
    cores, err = ttm_svd(t, 0, (2, 3), (4, 2), (1, 20, 1))  # bond can hold at most 6
    assert [tuple(c.shape) for c in cores] == [(1, 2, 4, 20), (20, 3, 2, 1)]
    assert err < 1e-12
    assert float(cores[1][6:].abs().max()) == 0.0


def test_ttm_shape_mismatch():
    t = torch.randn(2, 3, 4, 2)
    with pytest.raises(DecompositionError, match="same length"):
        ttm_svd(t, 0, (2, 3), (8,), (1, 2, 1))
    with pytest.raises(DecompositionError, match="does not match"):
        ttm_svd(t, 0, (3, 2), (4, 2), (1, 2, 1))
    with pytest.raises(RankError, match="length"):
        ttm_svd(t, 0, (2, 3), (4, 2), (1, 2, 2, 1))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("shape", "ranks"), [((4, 5, 6), (1, 3, 4, 1)), ((3, 4, 3, 4), (1, 2, 5, 3, 1))]
)
def test_tt_no_worse_than_tensorly(shape, ranks, seed):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train

    t = torch.randn(shape, generator=gen(seed), dtype=F64)
    _, err = tt_svd(t, ranks)
    ref = tl.tt_to_tensor(tensor_train(t.numpy(), list(ranks)))
    err_tl = float(np.linalg.norm(ref - t.numpy()) / np.linalg.norm(t.numpy()))
    assert err <= err_tl * (1 + 1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_ttm_no_worse_than_tensorly(seed):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix

    t = torch.randn(2, 3, 4, 4, 3, 2, generator=gen(seed), dtype=F64)
    ranks = (1, 5, 4, 1)
    _, err = ttm_svd(t, 0, (2, 3, 4), (4, 3, 2), ranks)
    ref = tl.tt_matrix_to_tensor(tensor_train_matrix(t.numpy(), list(ranks)))
    err_tl = float(np.linalg.norm(ref - t.numpy()) / np.linalg.norm(t.numpy()))
    assert err <= err_tl * (1 + 1e-6)
