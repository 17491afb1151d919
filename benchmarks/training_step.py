"""Training-step time of every format x implementation at 1024x1024, relative to dense.

Usage: python benchmarks/training_step.py [--threads 1] [--tltorch]

Forward + backward (input without grad, as for a first layer), 9 interleaved repeats in a
shuffled order, medians, each ratio against ``nn.Linear`` timed in the same loop: the
training regime of ``bench_linear.time_cell``, without its cache flush. ``--tltorch`` adds
tensorly-torch's BlockTT next to the TT-matrix rows. Used for the A/B figures of
benchmarks/RESULTS.md (run once before and once after a change, in one session).
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from bench_linear import time_cell as interleaved_medians  # benchmarks/ is this script's folder

import tensorfold
from tensorfold.formats import names
from tensorfold.functional import IMPLEMENTATIONS


def time_cell(cands: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median training-step time of each candidate over dense's (and dense's in ms)."""
    med = interleaved_medians(cands, x, repeats, torch.device("cpu"), math.inf, regimes=("train",))
    times = {k: v["train"] for k, v in med.items()}
    dense = times["dense"]
    out = {k: v / dense for k, v in times.items()}
    out["dense_ms"] = 1e3 * dense
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tltorch", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tltorch = None
    if a.tltorch:
        import tensorly
        import tltorch

        tensorly.set_backend("pytorch")
    in_m, out_m = tensorfold.tensorized_shape(1024, 1024, 3)
    print(f"1024x1024 as {out_m}x{in_m}, {a.threads} thread(s); ratios to dense, medians")
    for fmt in names():
        for frac in (0.01, 0.1):
            for rows in (32, 1024):
                cands: dict[str, torch.nn.Module] = {"dense": torch.nn.Linear(1024, 1024)}
                for impl in IMPLEMENTATIONS:
                    cands[impl] = tensorfold.FactorizedLinear(
                        in_m, out_m, factorization=fmt, rank=frac, implementation=impl
                    )
                if tltorch is not None and fmt == "ttm":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for impl in ("factorized", "reconstructed"):
                            cands[f"tlt-{impl}"] = tltorch.FactorizedLinear(
                                in_m, out_m, factorization="blocktt", rank=frac, implementation=impl
                            )
                ratios = time_cell(cands, torch.randn(rows, 1024), a.repeats)
                dense = ratios.pop("dense_ms")
                cells = " ".join(f"{k} {v:.2f}" for k, v in ratios.items() if k != "dense")
                print(f"{fmt:6s} {frac:4} {rows:5d} dense {dense:.2f} ms  {cells}", flush=True)


if __name__ == "__main__":
    main()
