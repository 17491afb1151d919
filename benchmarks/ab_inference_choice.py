"""Audit of 'auto''s inference choice: its three paths timed side by side, cold caches.

    python benchmarks/ab_inference_choice.py [--shapes 1024x1024,...] [--rows 32,1024,2048]
                                             [--formats cp,tucker,tt] [--repeats 7]

With parameters that do not change, 'auto' picks one of three paths: the cost model's
answer (``tensorfold.choice.choose`` with the operands ``--cache`` keeps; default
``'weights'``, which keeps both), timed by the layer at first use where contested
(``FactorizedLinear.explain``):

* ``factorized``: the planned contraction of ``x`` with the factors;
* ``split``: two thin GEMMs with a cached pair, ``W = up @ down`` at the narrowest cut;
* ``reconstructed``: one GEMM with a cached rebuilt ``W``.

This times all three (functional calls, operands built beforehand) for every layer that
has a split (CP, Tucker, TT; TT-matrix has none), interleaved in a random order, with
64 MB written before every call as in ``bench_linear.py``; medians of ``--repeats``
alternations x 3 calls. It prints each path's time relative to the dense GEMM, the cost
model's pick, what the layer runs, and that path's time relative to the fastest of the
three (1.00 = the right choice).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import tensorfold
from tensorfold.functional import factorized_linear, reconstruct_weight, split_weight

PATHS = ("factorized", "split", "reconstructed")


def _runs(x, factors, net, bias, down, up, weight) -> dict:
    """The three paths as calls, with every operand built beforehand."""
    return {
        "factorized": lambda: factorized_linear(x, factors, net, bias, "factorized"),
        "split": lambda: F.linear(F.linear(x, down), up, bias),
        "reconstructed": lambda: F.linear(x, weight, bias),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x1024,768x3072,3072x768,4096x4096")
    ap.add_argument("--rows", default="32,1024,2048")
    ap.add_argument("--formats", default="cp,tucker,tt")
    ap.add_argument("--fractions", default="0.01,0.1")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="weights", help="the layers' cache policy")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flush = torch.empty(
        2**24
    )  # 64 MB, written before every call; also lifts glibc's mmap threshold
    print(
        "| shape | rows | format | frac | rank | dense ms | factorized | split | reconstructed "
        "| model pick | pick | pick/best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = []
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
        for fmt in args.formats.split(","):
            for frac in (float(v) for v in args.fractions.split(",")):
                layer = tensorfold.FactorizedLinear(
                    in_modes,
                    out_modes,
                    factorization=fmt,
                    rank=frac,
                    implementation="auto",
                    cache=int(args.cache) if args.cache.isdigit() else args.cache,
                )
                net, bias = layer.weight.network, layer.bias.detach()
                factors = [f.detach() for f in layer.weight.layer_factors(())]
                if net.narrowest_cut(tuple(tuple(f.shape) for f in factors)) is None:
                    print(f"{fmt}: no split (a factor holds input and output modes); skipped")
                    break
                weight = reconstruct_weight(factors, net)
                down, up = split_weight(factors, net)
                for rows in (int(v) for v in args.rows.split(",")):
                    x = torch.randn(rows, in_f)
                    runs = _runs(x, factors, net, bias, down, up, weight)
                    times: dict[str, list[float]] = {p: [] for p in PATHS}
                    with torch.no_grad():
                        for fn in runs.values():
                            fn()
                        for r in range(args.repeats):
                            for path in random.Random(r).sample(PATHS, len(PATHS)):
                                for _ in range(3):
                                    flush.fill_(r)
                                    t0 = time.perf_counter()
                                    runs[path]()
                                    times[path].append(time.perf_counter() - t0)
                    med = {p: statistics.median(v) for p, v in times.items()}
                    dense = med["reconstructed"]
                    best = min(med.values())
                    with torch.no_grad():
                        why = layer.explain(x)
                    pick, model_pick = why.path, why.choice.path
                    rank = why.program.split.rank
                    worst.append(med[pick] / best)
                    print(
                        f"| {shape} | {rows} | {fmt} | {frac:g} | {rank} | {dense * 1e3:.3g} | "
                        + " | ".join(f"{med[p] / dense:.3f}" for p in PATHS)
                        + f" | {model_pick} | {pick} | {med[pick] / best:.2f} |",
                        flush=True,
                    )
    print(
        f"\npick within 1.1x of the fastest path: {sum(w <= 1.1 for w in worst)}/{len(worst)}, "
        f"worst {max(worst):.2f}x"
    )


if __name__ == "__main__":
    main()
