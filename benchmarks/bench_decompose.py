"""Time the four decompositions on a 1024 x 1024 weight at ~10% of its parameters.

The weight is viewed as the tensor (8, 8, 16) + (8, 8, 16) (out modes + in modes). Two
weights: i.i.d. normal, and one with a decaying spectrum (``s_i = 1 / (1 + i / 16)``).

    PYTHONPATH=src python benchmarks/bench_decompose.py [--repeats 3] [--cp-iters 100 25]
        [--cp-repeats N]

Prints a markdown table: method, ranks, seconds (median of the repeats), relative error.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from tensorfold.decompose import cp_als, tt_svd, ttm_svd, tucker_hooi

OUT_MODES = (8, 8, 16)
IN_MODES = (8, 8, 16)
MODES = OUT_MODES + IN_MODES
N_PARAMS = 1024 * 1024
BUDGET = 0.1 * N_PARAMS


def cp_rank() -> int:
    return math.floor(BUDGET / (sum(MODES) + 1))


def tt_ranks() -> tuple[int, ...]:
    """Constant bond ``r`` (capped at each bond's maximum) with params <= 10%."""
    n = len(MODES)
    caps = [min(math.prod(MODES[:k]), math.prod(MODES[k:])) for k in range(1, n)]

    def ranks(r: int) -> tuple[int, ...]:
        return (1, *[min(r, c) for c in caps], 1)

    def params(rk: tuple[int, ...]) -> int:
        return sum(rk[k] * MODES[k] * rk[k + 1] for k in range(n))

    r = 1
    while params(ranks(r + 1)) <= BUDGET and ranks(r + 1) != ranks(r):
        r += 1
    return ranks(r)


def ttm_ranks() -> tuple[int, ...]:
    pairs = [o * i for o, i in zip(OUT_MODES, IN_MODES, strict=True)]
    caps = [min(math.prod(pairs[:k]), math.prod(pairs[k:])) for k in range(1, len(pairs))]

    def ranks(r: int) -> tuple[int, ...]:
        return (1, *[min(r, c) for c in caps], 1)

    def params(rk: tuple[int, ...]) -> int:
        return sum(rk[k] * pairs[k] * rk[k + 1] for k in range(len(pairs)))

    r = 1
    while params(ranks(r + 1)) <= BUDGET and ranks(r + 1) != ranks(r):
        r += 1
    return ranks(r)


def tucker_ranks() -> tuple[int, ...]:
    """Per-mode ranks ``round(f * d_k)`` (>= 1) with the largest ``f`` keeping params <= 10%."""
    best = tuple(1 for _ in MODES)
    for step in range(1, 1001):
        f = step / 1000
        rk = tuple(max(1, min(d, round(f * d))) for d in MODES)
        if math.prod(rk) + sum(d * r for d, r in zip(MODES, rk, strict=True)) <= BUDGET:
            best = rk
    return best


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(1024, 1024, generator=g)
    u = torch.linalg.qr(torch.randn(1024, 1024, generator=g)).Q
    v = torch.linalg.qr(torch.randn(1024, 1024, generator=g)).Q
    s = 1.0 / (1.0 + torch.arange(1024, dtype=torch.float32) / 16)
    return {"normal": normal, "decaying": (u * s) @ v.T}


def timed(fn, repeats: int) -> tuple[float, float]:
    times, err = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        err = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cp-iters", type=int, nargs="+", default=[100, 25])
    parser.add_argument("--cp-repeats", type=int, default=None, help="default: --repeats")
    args = parser.parse_args()

    r_cp, r_tt, r_ttm, r_tucker = cp_rank(), tt_ranks(), ttm_ranks(), tucker_ranks()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"tensor {MODES}, budget {int(BUDGET)} params\n"
    )
    print("| weight | method | ranks | params | seconds (median) | rel error |")
    print("|---|---|---|---|---|---|")
    for name, w in weights().items():
        t = w.reshape(MODES)
        rows = [
            (
                "tt_svd",
                str(r_tt),
                sum(r_tt[k] * MODES[k] * r_tt[k + 1] for k in range(6)),
                lambda t=t: tt_svd(t, r_tt)[1],
            ),
            (
                "ttm_svd",
                str(r_ttm),
                sum(r_ttm[k] * (OUT_MODES[k] * IN_MODES[k]) * r_ttm[k + 1] for k in range(3)),
                lambda t=t: ttm_svd(t, 0, OUT_MODES, IN_MODES, r_ttm)[1],
            ),
            (
                "tucker_hooi",
                str(r_tucker),
                math.prod(r_tucker) + sum(d * r for d, r in zip(MODES, r_tucker, strict=True)),
                lambda t=t: tucker_hooi(t, r_tucker)[2],
            ),
        ]
        for iters in args.cp_iters:
            rows.append(
                (
                    f"cp_als (n_iter_max={iters})",
                    f"R={r_cp}",
                    r_cp * (sum(MODES) + 1),
                    lambda t=t, iters=iters: cp_als(t, r_cp, n_iter_max=iters)[2],
                )
            )
        for method, ranks, params, fn in rows:
            reps = args.cp_repeats if method.startswith("cp") and args.cp_repeats else args.repeats
            sec, err = timed(fn, reps)
            print(f"| {name} | {method} | {ranks} | {params} | {sec:.2f} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
