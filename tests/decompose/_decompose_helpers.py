"""Independent dense builders for the decomposition tests (plain einsum, no library code)."""

from __future__ import annotations

import string

import torch

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(t: torch.Tensor, t_hat: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t - t_hat) / torch.linalg.vector_norm(t))


def tt_dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of TT cores (r, n, r') or TT-matrix cores (r, o, i, r'), in C order
    of (layer/TT modes..., out modes..., in modes...)."""
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(len(cores) + 1)]
    specs, layer, outs, ins = [], [], [], []
    for k, c in enumerate(cores):
        if c.ndim == 3:
            m = next(letters)
            layer.append(m)
            specs.append(bonds[k] + m + bonds[k + 1])
        else:
            o, i = next(letters), next(letters)
            outs.append(o)
            ins.append(i)
            specs.append(bonds[k] + o + i + bonds[k + 1])
    out = bonds[0] + "".join(layer + outs + ins) + bonds[-1]
    return torch.einsum(",".join(specs) + "->" + out, *cores)[0, ..., 0]


def tucker_dense(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    n = core.ndim
    small, big = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = small + "," + ",".join(big[k] + small[k] for k in range(n)) + "->" + big
    return torch.einsum(spec, core, *factors)


def cp_dense(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    n = len(factors)
    idx = string.ascii_lowercase[:n]
    spec = "z," + ",".join(c + "z" for c in idx) + "->" + idx
    return torch.einsum(spec, weights, *factors)


def random_tt(shape, ranks, seed=0, dtype=F64) -> torch.Tensor:
    g = gen(seed)
    cores = [
        torch.randn(ranks[k], shape[k], ranks[k + 1], generator=g, dtype=dtype)
        for k in range(len(shape))
    ]
    return tt_dense(cores)


def random_tucker(shape, ranks, seed=0, dtype=F64) -> torch.Tensor:
    g = gen(seed)
    core = torch.randn(*ranks, generator=g, dtype=dtype)
    factors = [
        torch.randn(d, r, generator=g, dtype=dtype) for d, r in zip(shape, ranks, strict=True)
    ]
    return tucker_dense(core, factors)


def random_cp(shape, rank, seed=0, dtype=F64) -> torch.Tensor:
    g = gen(seed)
    factors = [torch.randn(d, rank, generator=g, dtype=dtype) for d in shape]
    return cp_dense(torch.ones(rank, dtype=dtype), factors)
