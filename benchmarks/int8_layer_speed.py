"""One TT layer with int8 factors against the same layer in float32 and the dense layer.

    python benchmarks/int8_layer_speed.py [--threads 2]

The three are timed interleaved in one loop (inference, default cache policy); medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import tensorfold

CASES = [(384, 384, 0.5), (1536, 384, 0.25), (384, 1536, 0.5)]  # out, in, share kept
ROWS = [1, 32, 1024]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for n_out, n_in, share in CASES:
        dense = torch.nn.Linear(n_in, n_out)
        fp32 = tensorfold.FactorizedLinear.from_linear(
            dense,
            rank=share,
            in_tensorized_features=(n_in,),
            out_tensorized_features=(n_out,),
            factorization="tt",
            implementation="auto",
        )
        int8 = copy.deepcopy(fp32)
        int8.weight.quantize_()
        layers = {"dense": dense, "fp32": fp32, "int8": int8}
        for rows in ROWS:
            x = torch.randn(rows, n_in)
            times: dict[str, list[float]] = {k: [] for k in layers}
            with torch.inference_mode():
                for layer in layers.values():
                    layer(x)  # warm: the choice per batch bucket is made here
                for _ in range(200 if rows < 1024 else 30):
                    for name, layer in layers.items():
                        start = time.perf_counter()
                        layer(x)
                        times[name].append(time.perf_counter() - start)
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            print(
                f"{n_out}x{n_in} at {share:.0%}, {rows} rows: dense {us['dense']:.1f} us, "
                f"float32 factors {us['fp32']:.1f} us, int8 {us['int8']:.1f} us; "
                f"int8 / float32 {us['int8'] / us['fp32']:.2f}x, "
                f"int8 / dense {us['int8'] / us['dense']:.2f}x"
            )


if __name__ == "__main__":
    main()
