"""Behaviour shared by all four decompositions: input checks, scale, zeros, dtypes, seeds."""

from __future__ import annotations

import pytest
import torch
from _decompose_helpers import F64, cp_dense, gen, rel_err, tt_dense, tucker_dense

from tensorfold.decompose import cp_als, tt_svd, ttm_svd, tucker_hooi
from tensorfold.errors import DecompositionError

SHAPE = (3, 4, 2, 5)


def _tt(t, **kw):
    cores, err = tt_svd(t, (1, 3, 5, 4, 1), **kw)
    return cores, err, tt_dense(cores)


def _ttm(t, **kw):
    # (3, 4) layer-free TT-matrix with out modes (3, 4) and in modes (2, 5)
    cores, err = ttm_svd(t, 0, (3, 4), (2, 5), (1, 5, 1), **kw)
    return cores, err, tt_dense(cores)


def _tucker(t, **kw):
    core, factors, err = tucker_hooi(t, (2, 3, 2, 4), **kw)
    return [core, *factors], err, tucker_dense(core, factors)


def _cp(t, **kw):
    weights, factors, err = cp_als(t, 4, n_iter_max=30, **kw)
    return [weights, *factors], err, cp_dense(weights, factors)


METHODS = {"tt": _tt, "ttm": _ttm, "tucker": _tucker, "cp": _cp}
EXPECTED_SHAPES = {
    "tt": [(1, 3, 3), (3, 4, 5), (5, 2, 4), (4, 5, 1)],
    "ttm": [(1, 3, 2, 5), (5, 4, 5, 1)],
    "tucker": [(2, 3, 2, 4), (3, 2), (4, 3), (2, 2), (5, 4)],
    "cp": [(4,), (3, 4), (4, 4), (2, 4), (5, 4)],
}


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def _data(seed=0, dtype=F64):
    return torch.randn(SHAPE, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(method, bad):
    t = _data()
    t[1, 2, 0, 3] = bad
    with pytest.raises(DecompositionError, match="NaN"):
        METHODS[method](t)


def test_shapes_and_reported_error(method):
    params, err, t_hat = METHODS[method](_data())
    assert [tuple(p.shape) for p in params] == EXPECTED_SHAPES[method]
    assert isinstance(err, float)
    assert 0.0 < err < 1.0
    assert err == pytest.approx(rel_err(_data(), t_hat), rel=1e-9)


def test_all_zero(method):
    params, err, t_hat = METHODS[method](torch.zeros(SHAPE))
    assert err == 0.0
    assert [tuple(p.shape) for p in params] == EXPECTED_SHAPES[method]
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert float(t_hat.abs().max()) == 0.0


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_huge_and_tiny_norms(method, scale):
    t = _data()
    _, err_1, hat_1 = METHODS[method](t)
    params, err_s, hat_s = METHODS[method](t * scale)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert err_s == pytest.approx(err_1, rel=1e-6)
    torch.testing.assert_close(hat_s / scale, hat_1, rtol=1e-6, atol=1e-9)


def test_huge_float32_entries_do_not_overflow(method):
    # ||T||^2 of this float32 tensor overflows float32; scaling must happen first.
    t = _data(dtype=torch.float32) * 1e20
    params, err, _ = METHODS[method](t)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert 0.0 < err < 1.0


@pytest.mark.parametrize(
    ("in_dtype", "compute", "out_dtype"),
    [
        (torch.float64, None, torch.float64),
        (torch.float32, None, torch.float32),
        (torch.float16, None, torch.float32),
        (torch.int64, None, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.float32),
    ],
)
def test_compute_dtype(method, in_dtype, compute, out_dtype):
    t = (_data() * 4).to(in_dtype)
    params, _, _ = METHODS[method](t, compute_dtype=compute)
    assert all(p.dtype == out_dtype for p in params)
    assert all(p.device == t.device for p in params)


def test_bad_compute_dtype(method):
    with pytest.raises(DecompositionError, match="compute_dtype"):
        METHODS[method](_data(), compute_dtype=torch.float16)


def test_deterministic_with_generator(method):
    t = _data(dtype=torch.float32)
    a, err_a, _ = METHODS[method](t, generator=gen(7))
    b, err_b, _ = METHODS[method](t, generator=gen(7))
    assert err_a == err_b
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_does_not_track_gradients(method):
    t = _data().requires_grad_(True)
    params, _, _ = METHODS[method](t)
    assert not any(p.requires_grad for p in params)
