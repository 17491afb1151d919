"""``torch.compile(fullgraph=True)`` and ``torch.export`` of factorized layers.

``fullgraph=True`` turns any graph break into an error, so a passing test means one graph.
The default run traces every format x implementation with the ``aot_eager`` backend
(Dynamo + AOTAutograd, forward and backward, no code generation: seconds, not minutes)
and compiles a representative pair with Inductor; ``pytest -m slow`` compiles the whole
grid with Inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorfold import FactorizedLinear
from tensorfold.formats import names
from tensorfold.functional import IMPLEMENTATIONS

FORMATS = list(names())
GRID = [(f, i) for f in FORMATS for i in IMPLEMENTATIONS]
INDUCTOR_SUBSET = [("tucker", "factorized"), ("ttm", "auto")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with an empty Dynamo cache (no cross-test recompiles/limits)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Tiny shapes, unequal mode counts (the TT-matrix pads), a joint 2-layer tensor.
OUT_MODES = (4, 2)
# With a size-1 mode too. Not under aot_eager: for size-1 dims (a 1-mode, a rank of 1, a
# single row) the strides AOTAutograd traces with fake tensors can differ from those the
# eager kernels return, and aot_eager's eager replay of einsum's internal views then fails
# (a PyTorch issue, seen with Tucker; Inductor and torch.export are unaffected).
OUT_MODES_WITH_ONE = (4, 2, 1)


def _layer(
    fmt: str, implementation: str, device: torch.device, out_modes=OUT_MODES, **kw
) -> FactorizedLinear:
    torch.manual_seed(0)
    return FactorizedLinear(
        (2, 3),
        out_modes,
        factorization=fmt,
        rank=0.5,
        n_layers=2,
        implementation=implementation,
        device=device,
        **kw,
    )


def _check_forward_backward(layer: nn.Module, compiled, x: torch.Tensor, index: int) -> None:
    eager = copy.deepcopy(layer)
    x_eager = x.detach().clone().requires_grad_(True)
    x_comp = x.detach().clone().requires_grad_(True)
    y_eager = eager(x_eager, index)
    y_comp = compiled(x_comp, index)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), eager.parameters(), strict=False):
        assert p.grad is not None, f"no gradient reached {name} through the compiled graph"
        torch.testing.assert_close(
            p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(("fmt", "implementation"), GRID)
def test_fullgraph_trace_forward_backward(fmt, implementation, device) -> None:
    layer = _layer(fmt, implementation, device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _check_forward_backward(layer, compiled, torch.randn(3, 6, device=device), index=1)


@pytest.mark.parametrize(("fmt", "implementation"), INDUCTOR_SUBSET)
def test_fullgraph_inductor(fmt, implementation, device) -> None:
    layer = _layer(fmt, implementation, device, out_modes=OUT_MODES_WITH_ONE)
    compiled = torch.compile(layer, fullgraph=True)
    _check_forward_backward(layer, compiled, torch.randn(3, 6, device=device), index=1)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "implementation"), [c for c in GRID if c not in INDUCTOR_SUBSET])
def test_fullgraph_inductor_grid(fmt, implementation, device) -> None:
    test_fullgraph_inductor(fmt, implementation, device)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fullgraph_across_batch_shapes(fmt, device) -> None:
    """New batch sizes recompile with a symbolic batch (automatic dynamic shapes), zero rows,
    a single row and extra leading dims included, still without a graph break. (Dynamo only:
    aot_eager trips over single rows, see OUT_MODES_WITH_ONE.)"""
    layer = _layer(fmt, "auto", device)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=counting_backend)
    with torch.no_grad():
        for shape in [(3, 6), (5, 6), (9, 6), (33, 6), (0, 6), (2, 7, 6), (6,)]:
            x = torch.randn(*shape, device=device)
            torch.testing.assert_close(compiled(x, 0), layer(x, 0), rtol=1e-5, atol=1e-5)
            if shape == (5, 6):
                after_dynamic = len(graphs)
            if shape == (33, 6):  # the symbolic batch is not specialised: no recompiles
                assert len(graphs) == after_dynamic, "batch sizes 9 and 33 recompiled"


@pytest.mark.parametrize("fmt", ["tucker", "ttm"])
def test_fullgraph_with_checkpointing(fmt, device) -> None:
    layer = _layer(fmt, "reconstructed", device, checkpointing=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _check_forward_backward(layer, compiled, torch.randn(3, 6, device=device), index=0)


def test_compiled_to_matrix(device) -> None:
    """Rebuilding a weight inside compiled code (e.g. a regulariser) is one graph too."""
    layer = _layer("tt", "factorized", device)

    def penalty(module: FactorizedLinear) -> torch.Tensor:
        return module.weight.to_matrix((1,)).square().sum()

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(layer), penalty(layer))


class SmallModel(nn.Module):
    """Every format in one model, one of them with two layers used in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.cp = FactorizedLinear((2, 4), (3, 4), factorization="cp", rank=0.5)
        self.tucker = FactorizedLinear(
            (3, 4), (4, 3), factorization="tucker", rank=0.5, implementation="reconstructed"
        )
        self.tt = FactorizedLinear(
            (4, 3), (2, 2, 3), factorization="tt", rank=0.5, implementation="auto"
        )
        self.ttm = FactorizedLinear((12,), (2, 4), factorization="ttm", rank=0.5, n_layers=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.cp(x))
        h = torch.relu(self.tucker(h))
        h = self.tt(h)
        h = torch.tanh(self.ttm(h, 0)) * self.ttm(h, 1)
        return self.head(h)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_matches_eager(strict, device) -> None:
    torch.manual_seed(0)
    model = SmallModel().to(device).eval()
    x = torch.randn(5, 8, device=device)
    batch = torch.export.Dim("batch", min=2, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}, strict=strict)
    program = exported.module()
    for rows in (5, 2, 33):
        x = torch.randn(rows, 8, device=device)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_static_batch_round_trip(tmp_path, device) -> None:
    """An exported program saves and loads like any other (``torch.export.save/load``)."""
    torch.manual_seed(0)
    model = SmallModel().to(device).eval()
    x = torch.randn(4, 8, device=device)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
