"""A small end-to-end demo on an embedded layer stack: parameters, error and speed per format.

The stack is generated deterministically (no download): two linear layers whose
weights have the power-law singular spectra typical of trained networks, so the
numbers mean something, unlike on white-noise weights. Run ``python -m tensorfold.layer_demo``.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .formats import names
from .nn import FactorizedLinear

FORMATS = names()
WIDTHS = (256, 512, 256)


def embedded_stack(seed: int = 0) -> nn.Sequential:
    """Linear layers 256 -> 512 -> 256 with spectra ``s_k ~ k^-0.8`` (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:], strict=False):
        k = min(fan_in, fan_out)
        u, _ = torch.linalg.qr(torch.randn(fan_out, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(fan_in, k, generator=g))
        spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            weight = (u * spectrum) @ v.T
            linear.weight.copy_(weight / weight.std() / (3 * fan_in) ** 0.5)
        layers += [linear, nn.GELU()]
    return nn.Sequential(*layers[:-1])


def _median_time(fn, x: torch.Tensor, repeats: int = 15) -> float:
    times = []
    with torch.no_grad():
        fn(x)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compress(stack: nn.Sequential, factorization: str, rank: float) -> nn.Sequential:
    """A copy of ``stack`` with every Linear replaced by ``FactorizedLinear.from_linear``."""
    return nn.Sequential(
        *[
            FactorizedLinear.from_linear(
                m, rank=rank, factorization=factorization, implementation="auto"
            )
            if isinstance(m, nn.Linear)
            else m
            for m in stack
        ]
    )


def main(rank: float = 0.25, rows: int = 256) -> list[dict[str, object]]:
    """Compress the embedded stack with every format at ``rank``; print and return a table."""
    torch.manual_seed(0)
    stack = embedded_stack()
    x = torch.randn(rows, WIDTHS[0])
    with torch.no_grad():
        reference = stack(x)
    dense_params = sum(m.weight.numel() for m in stack if isinstance(m, nn.Linear))
    dense_time = _median_time(stack, x)
    print(
        f"Embedded stack {' -> '.join(map(str, WIDTHS))}: {dense_params:,} weight parameters, "
        f"rank={rank} (fraction kept), {rows} rows"
    )
    print(
        f"{'format':<8} {'params kept':>12} {'weight err':>11} {'output err':>11} "
        f"{'decompose s':>12} {'time vs dense':>14}"
    )
    rows_out = []
    for fmt in FORMATS:
        start = time.perf_counter()
        small = compress(stack, fmt, rank)
        seconds = time.perf_counter() - start
        layers = [m for m in small if isinstance(m, FactorizedLinear)]
        kept = sum(m.weight.num_parameters() for m in layers) / dense_params
        weight_err = statistics.mean(m.decomposition_error for m in layers)
        with torch.no_grad():
            out_err = (
                torch.linalg.norm(small(x) - reference) / torch.linalg.norm(reference)
            ).item()
        ratio = _median_time(small, x) / dense_time
        rows_out.append(
            {
                "format": fmt,
                "kept": kept,
                "weight_error": weight_err,
                "output_error": out_err,
                "seconds": seconds,
                "time_ratio": ratio,
            }
        )
        print(
            f"{fmt:<8} {kept:>12.1%} {weight_err:>11.3f} {out_err:>11.3f} "
            f"{seconds:>12.2f} {ratio:>13.2f}x"
        )
    return rows_out


if __name__ == "__main__":
    main()
