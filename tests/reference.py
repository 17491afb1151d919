"""Independent dense references: rebuild a format's full tensor with plain loops.

Deliberately written without the library's einsum networks, so a bug in the
labels or the planner cannot hide in both the code and its reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cp_dense(weights: Tensor, factors: list[Tensor]) -> Tensor:
    dims = [f.shape[0] for f in factors]
    total = torch.zeros(math.prod(dims), dtype=weights.dtype)
    for r in range(weights.shape[0]):
        term = weights[r].reshape(1)
        for f in factors:
            term = torch.outer(term, f[:, r]).flatten()
        total = total + term
    return total.reshape(dims)


def tucker_dense(core: Tensor, factors: list[Tensor]) -> Tensor:
    out = core
    for k, f in enumerate(factors):
        # mode-k product: contract core mode k with the factor's rank index
        out = torch.movedim(torch.tensordot(out, f, dims=([k], [1])), -1, k)
    return out


def tt_dense(cores: list[Tensor]) -> Tensor:
    dims = [c.shape[1] for c in cores]
    out = cores[0].reshape(-1, cores[0].shape[-1])  # (d0, r1)
    for c in cores[1:]:
        out = out @ c.reshape(c.shape[0], -1)  # (prod, d_k * r_k)
        out = out.reshape(-1, c.shape[-1])
    return out.reshape(dims)


def ttm_dense(layer_cores: list[Tensor], cores: list[Tensor]) -> Tensor:
    """Full tensor ``layer_shape + outs + ins`` of a TT-matrix (4-way cores after 3-way
    layer cores)."""
    merged = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in layer_cores]
    merged += [c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in cores]
    full = tt_dense(merged)
    n_layer = len(layer_cores)
    layer_shape = [c.shape[1] for c in layer_cores]
    outs = [c.shape[1] for c in cores]
    ins = [c.shape[2] for c in cores]
    full = full.reshape(layer_shape + [d for pair in zip(outs, ins, strict=False) for d in pair])
    n = len(cores)
    perm = (
        list(range(n_layer))
        + [n_layer + 2 * k for k in range(n)]
        + [n_layer + 2 * k + 1 for k in range(n)]
    )
    return full.permute(perm)


def lowrank_dense(u: Tensor, coef: Tensor, perm: Tensor, in_modes: tuple[int, ...]) -> Tensor:
    """``U [I C] P`` per layer: column ``j`` of ``[I C]`` is input feature ``perm[j]``."""
    k = u.shape[-1]
    layer_shape, out_modes = tuple(perm.shape[:-1]), tuple(u.shape[len(perm.shape) - 1 : -1])
    n = math.prod(layer_shape)
    u = u.reshape(n, math.prod(out_modes), k)
    coef, perm = coef.reshape(n, k, coef.shape[-1]), perm.reshape(n, perm.shape[-1])
    out = []
    for ui, ci, pi in zip(u, coef, perm, strict=True):
        v = torch.zeros(k, pi.numel(), dtype=ci.dtype)
        for j in range(pi.numel()):
            v[:, pi[j]] = torch.eye(k, dtype=ci.dtype)[:, j] if j < k else ci[:, j - k]
        out.append(ui @ v)
    return torch.stack(out).reshape(*layer_shape, *out_modes, *in_modes)


def dense_tensor(fmt: str, factors: list[Tensor], n_layer_modes: int, tensor=None) -> Tensor:
    """The full tensor of ``factors`` in format ``fmt`` (layer modes first); ``tensor``: the
    format module, for what lowrank keeps beside its factors (the permutation)."""
    if fmt == "lowrank":
        return lowrank_dense(factors[0], factors[1], tensor.perm, tensor.in_modes)
    if fmt == "cp":
        return cp_dense(factors[0], list(factors[1:]))
    if fmt == "tucker":
        return tucker_dense(factors[0], list(factors[1:]))
    if fmt == "tt":
        return tt_dense(list(factors))
    if fmt == "ttm":
        return ttm_dense(list(factors[:n_layer_modes]), list(factors[n_layer_modes:]))
    raise ValueError(fmt)


def dense_weight(layer, indices: tuple[int, ...] = ()) -> Tensor:
    """The ``(out, in)`` weight of one layer of a FactorizedLinear, by the reference."""
    factors = [f.detach() for f in layer.weight.factors]
    full = dense_tensor(layer.factorization, factors, len(layer.layer_shape), layer.weight)
    if indices:
        full = full[indices]
    # The TT-matrix pads the shorter side with 1-modes: a reshape removes them.
    return full.reshape(layer.out_features, layer.in_features)
