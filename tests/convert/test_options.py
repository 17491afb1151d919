"""Option objects of plan / tensorize / distill: the same results as keywords, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorfold import ConversionError, DistillOptions, FitOptions, ModelCall, PlanOptions
from tensorfold.convert import distill, plan, tensorize


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))


def calib(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 64, generator=g) for _ in range(n)]


def weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_an_options_object_and_keywords_give_the_same_model() -> None:
    a, b = net(), net()
    tensorize(a, PlanOptions(budget=0.4, factorization="tucker"), calib(), progress=False)
    tensorize(b, budget=0.4, factorization="tucker", calibration=calib(), progress=False)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_keywords_override_the_object() -> None:
    options = PlanOptions(budget=0.8, factorization="tt")
    p = plan(net(), options, budget=0.3)
    assert p.budget == 0.3 and p.factorization == "tt"
    assert options.budget == 0.8  # the object itself is unchanged (frozen)
    assert plan(net(), options).budget == 0.8


def test_fit_and_call_groups_are_used() -> None:
    calls = []

    def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape)
        return model(batch)

    m = net()
    report = tensorize(
        m,
        PlanOptions(budget=0.5),
        calib(),
        fit=FitOptions(sequential=False, implementation="reconstructed"),
        call=ModelCall(forward=forward),
        progress=False,
    )
    assert calls, "the custom forward ran on the calibration batches"
    assert report.kept <= 0.5 * 1.02
    assert all(m[i].implementation == "reconstructed" for i in (0, 2))


def test_distill_options_object_equals_keywords() -> None:
    teacher = net()
    s1 = copy.deepcopy(teacher)
    tensorize(s1, budget=0.3, progress=False)
    s2 = copy.deepcopy(s1)
    l1 = distill(s1, teacher, calib(), DistillOptions(steps=5, lr=1e-2), progress=False)
    l2 = distill(s2, teacher, calib(), steps=5, lr=1e-2, progress=False)
    assert len(l1) == 5 and l1 == l2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m: tensorize(m, budgt=0.5, progress=False),
            r"tensorize\(\) got unknown option\(s\) \['budgt'\]; known: \[.*'budget'",
        ),
        (
            lambda m: plan(m, sequential=False),
            r"plan\(\) got unknown option\(s\) \['sequential'\]",
        ),
        (
            lambda m: tensorize(m, FitOptions(), progress=False),
            r"tensorize\(\) got FitOptions\(\.\.\.\) where a PlanOptions belongs",
        ),
        (
            lambda m: tensorize(m, fit=PlanOptions(), progress=False),
            r"where a FitOptions belongs",
        ),
        (
            lambda m: distill(m, net(), calib(), stpes=3, progress=False),
            r"distill\(\) got unknown option\(s\) \['stpes'\]; known: \[.*'steps'",
        ),
    ],
)
def test_unknown_or_misplaced_options_are_refused_and_change_nothing(call, match: str) -> None:
    m = net()
    before = weights(m)
    with pytest.raises(ConversionError, match=match):
        call(m)
    after = weights(m)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PlanOptions(budget=2), r"budget=2 must be a float in \(0, 1\]"),
        (lambda: PlanOptions(factorization="svd"), r"factorization='svd' is not known"),
        (lambda: PlanOptions(allocation="greedy"), r"allocation='greedy' must be"),
        (lambda: PlanOptions(budget=None), r"give budget="),
        (
            lambda: PlanOptions(factorization="auto", candidates=[]),
            r"candidates=\[\] must name one or more formats",
        ),
        (lambda: DistillOptions(steps=-1), r"steps=-1 must be an int >= 0"),
        (lambda: DistillOptions(max_seconds=0), r"max_seconds=0 must be > 0"),
    ],
)
def test_options_are_checked_when_made(make, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        make()


def test_repr_shows_the_fields_set() -> None:
    assert repr(PlanOptions(budget=0.25)) == "PlanOptions(budget=0.25, ...)"
    assert repr(FitOptions()) == "FitOptions(...)"
