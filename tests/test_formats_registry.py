"""The format registry (``register``, ``names``, ``FormatName``) and the public extension
points of formats (``copy_factors_``, ``low_rank_capacity``, ``assign_low_rank_``), with the
argument names their errors carry."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from reference import dense_tensor

from tensorfold import formats
from tensorfold.errors import FactorizationError, RankError, ShapeError
from tensorfold.formats import FORMATS, FormatName, get_format, names, register
from tensorfold.formats.cp import CPTensor


def test_names_are_the_builtin_formats_in_order():
    assert names() == ("cp", "tucker", "tt", "ttm", "lowrank")
    assert names() == get_args(FormatName)
    assert set(names()) == set(FORMATS)
    for name in names():
        assert get_format(name).name == name


def _subclass(name, aliases=()):
    return type("Fresh", (CPTensor,), {"name": name, "aliases": aliases})


@pytest.mark.parametrize(
    "name, aliases, pattern",
    [
        ("cp", (), r"register\(Fresh\): name or alias 'cp' is already taken by CPTensor"),
        ("fresh", ("mpo",), r"name or alias 'mpo' is already taken by TTMTensor"),
        ("Fresh", (), r"name or alias 'Fresh' must be a non-empty lower-case string"),
        ("", (), r"name or alias '' must be a non-empty lower-case string"),
        ("fresh", ("fresh",), r"aliases \('fresh', 'fresh'\) repeat a name"),
    ],
)
def test_register_refuses_taken_or_bad_names_and_registers_nothing(name, aliases, pattern):
    registry, aliases_before = dict(FORMATS), dict(formats.base._ALIASES)
    with pytest.raises(FactorizationError, match=pattern):
        register(_subclass(name, aliases))
    assert FORMATS == registry and formats.base._ALIASES == aliases_before


def test_a_new_format_is_listed_after_the_builtins():
    cls = _subclass("fresh", ("fresh-cp",))
    try:
        register(cls)
        assert names() == ("cp", "tucker", "tt", "ttm", "lowrank", "fresh")
        assert get_format("FRESH-CP") is cls
    finally:
        FORMATS.pop("fresh", None)
        formats.base._ALIASES.pop("fresh", None)
        formats.base._ALIASES.pop("fresh-cp", None)
    assert names() == ("cp", "tucker", "tt", "ttm", "lowrank")


# ---- copy_factors_ ------------------------------------------------------------------


def test_copy_factors_writes_values_into_the_same_parameters():
    t = get_format("tucker")((2, 3), (4,), rank=(2, 2, 3), dtype=torch.float64)
    params = list(t.factors)
    values = [torch.randn(p.numel(), dtype=torch.float32) for p in params]  # flat, float32
    t.copy_factors_(values)
    assert list(t.factors) == params
    for p, v in zip(params, values, strict=True):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), v.double().reshape(p.shape), rtol=0, atol=0)


def test_copy_factors_refuses_wrong_count_or_size_and_writes_nothing():
    t = get_format("cp")((2,), (3,), rank=2)
    before = [f.detach().clone() for f in t.factors]
    with pytest.raises(ShapeError, match=r"values: 2 tensors given, but 'cp' has 3 factors"):
        t.copy_factors_([torch.ones(2), torch.ones(2, 2)])
    with pytest.raises(
        ShapeError, match=r"values\[2\] of shape \(2, 2\) does not fit factor 2 of shape \(3, 2\)"
    ):
        t.copy_factors_([torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2)])
    for f, b in zip(t.factors, before, strict=True):
        assert torch.equal(f, b)


# ---- low-rank assignment -----------------------------------------------------------


@pytest.mark.parametrize("fmt, rank, capacity", [("cp", 5, 5), ("tt", 4, 4), ("tt", 9, 6)])
@pytest.mark.parametrize("terms", ["fewer", "all"])
def test_assign_low_rank_is_exact(fmt, rank, capacity, terms):
    t = get_format(fmt)((6,), (7,), rank=rank, dtype=torch.float64)
    assert t.low_rank_capacity() == capacity  # the TT bond is capped at min(6, 7)
    m = capacity - 2 if terms == "fewer" else capacity
    g = torch.Generator().manual_seed(0)
    left = torch.randn(6, m, generator=g, dtype=torch.float64)
    right = torch.randn(m, 7, generator=g, dtype=torch.float64)
    assert t.assign_low_rank_(left, right) is True
    rebuilt = dense_tensor(fmt, [f.detach() for f in t.factors], 0, t)
    torch.testing.assert_close(rebuilt, left @ right, rtol=1e-12, atol=1e-12)
    if fmt == "cp":  # columns normalised, the scale in the weights, unused terms zero
        norms = t.factors[1].detach().norm(dim=0)
        torch.testing.assert_close(norms[:m], torch.ones(m, dtype=torch.float64))
        assert torch.all(t.factors[0].detach()[m:] == 0)


@pytest.mark.parametrize(
    "fmt, out_modes, in_modes, rank, layer_shape",
    [
        ("tucker", (6,), (7,), 3, ()),
        ("ttm", (2, 3), (7, 1), 2, ()),
        ("cp", (2, 3), (7,), 3, ()),
        ("tt", (6,), (7,), 3, (2,)),
    ],
)
def test_formats_that_are_not_a_matrix_factorisation_decline(
    fmt, out_modes, in_modes, rank, layer_shape
):
    t = get_format(fmt)(out_modes, in_modes, rank, layer_shape, dtype=torch.float64)
    before = [f.detach().clone() for f in t.factors]
    assert t.low_rank_capacity() is None
    left = torch.randn(math.prod(out_modes), 1, dtype=torch.float64)
    assert (
        t.assign_low_rank_(left, torch.randn(1, math.prod(in_modes), dtype=torch.float64)) is False
    )
    for f, b in zip(t.factors, before, strict=True):
        assert torch.equal(f, b)


def test_more_terms_than_the_capacity_are_declined():
    t = get_format("cp")((6,), (7,), rank=2, dtype=torch.float64)
    before = [f.detach().clone() for f in t.factors]
    assert t.assign_low_rank_(torch.randn(6, 3), torch.randn(3, 7)) is False
    for f, b in zip(t.factors, before, strict=True):
        assert torch.equal(f, b)


def test_assign_low_rank_checks_shapes():
    t = get_format("tt")((6,), (7,), rank=2)
    with pytest.raises(ShapeError, match=r"left \(6, 2\) and right \(3, 7\) must be matrices"):
        t.assign_low_rank_(torch.randn(6, 2), torch.randn(3, 7))
    with pytest.raises(
        ShapeError,
        match=r"left @ right is 5 x 7, but the weight is out_features x in_features = 6 x 7",
    ):
        t.assign_low_rank_(torch.randn(5, 2), torch.randn(2, 7))


# ---- errors from formats name their argument ------------------------------------------


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (((0, 2), (3,)), ShapeError, r"out_modes=\(0, 2\) must hold positive ints"),
        (((2,), ()), ShapeError, r"in_modes=\(\) must be a non-empty tuple"),
        (((2,), (3,), 1, (2, -1)), ShapeError, r"layer_shape=\(2, -1\) must hold positive ints"),
        (
            ((2,) * 13, (2,) * 13),
            ShapeError,
            r"layer_shape=\(\), out_modes=\(2, .*\), in_modes=\(2, .*\): 26 modes in all, "
            r"more than the 24 supported",
        ),
        (((2,), (3,), "half"), RankError, r"rank='half' must be 'same'"),
        (((2,), (3,), (1, 2)), RankError, r"rank=\(1, 2\): CP takes a single int rank"),
    ],
)
def test_format_errors_name_the_argument(args, error, pattern):
    with pytest.raises(error, match=pattern):
        get_format("cp")(*args)


def test_a_budget_the_format_cannot_meet_names_the_rank():
    with pytest.raises(
        RankError, match=r"rank=0.5: a budget of 60 parameters cannot be met by 'ttm'"
    ):
        get_format("ttm")((10,), (12,), rank=0.5)


def test_fitting_a_tensor_of_the_wrong_shape_names_the_expected_one():
    t = get_format("tt")((2, 3), (4,), rank=2)
    with pytest.raises(
        ShapeError,
        match=r"tensor of shape \(6, 4\) cannot be fitted: it must have shape "
        r"layer_shape \+ out_modes \+ in_modes = \(2, 3, 4\)",
    ):
        t.fit_(torch.randn(6, 4))
