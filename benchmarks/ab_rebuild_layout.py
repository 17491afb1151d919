"""A/B of the rebuild layout: the last step laid out by contiguous run vs by the flat copy price.

    python benchmarks/ab_rebuild_layout.py [--threads 2] [--repeats 9]

Same process, same factors: for every layer whose rebuild plan the layout changes,
the plan is compiled both ways (``contraction._compile`` with and without
``layout_by_run``; plan caches cleared between them), and the rebuild alone
(``no_grad``) and rebuild + backward are timed in alternation, in a random order
each repeat. Prints medians and the ratio new / old.

A 16 MB tensor is allocated and freed first: glibc serves a request at or above its
mmap threshold with fresh pages (about 1 ms of page faults per 4 MB here), and it
raises that threshold only once a larger block has been freed. Without this the
first cells measured page faults (Tucker 1% 1024x1024: 2.5 ms instead of 0.3 ms for
the same plan), as in a process that never held a large tensor.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import tensorfold
from tensorfold import contraction, functional

SHAPES = [(1024, 1024), (768, 3072), (3072, 768)]
_LAYOUT_BY_RUN = contraction._compile


def _flat(*args, layout_by_run: bool = False, **kwargs):  # noqa: ARG001 - the old behaviour
    return _LAYOUT_BY_RUN(*args, **kwargs)


def use(variant: str) -> None:
    contraction._compile = _LAYOUT_BY_RUN if variant == "new" else _flat
    contraction.contraction_plan.cache_clear()
    functional._rebuild_plan.cache_clear()
    functional.layer_program.cache_clear()


def changed_layers() -> list[tuple[tuple[int, int], str, float]]:
    found = []
    for in_f, out_f in SHAPES:
        in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
        for fmt in ("cp", "tucker", "tt", "ttm"):
            for frac in (0.01, 0.1):
                layer = tensorfold.FactorizedLinear(
                    in_modes, out_modes, factorization=fmt, rank=frac
                )
                factors = layer.weight.layer_factors(())
                shapes = tuple(tuple(f.shape) for f in factors)
                perms = []
                for variant in ("old", "new"):
                    use(variant)
                    plan = functional._rebuild_plan(layer.weight.network, shapes, "cpu", 4)
                    perms.append(plan.final_perm)
                if perms[0] != perms[1]:
                    found.append(((in_f, out_f), fmt, frac))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.empty(2**22).fill_(0.0)  # 16 MB allocated and freed: see the docstring
    for (in_f, out_f), fmt, frac in changed_layers():
        in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
        torch.manual_seed(0)
        layer = tensorfold.FactorizedLinear(in_modes, out_modes, factorization=fmt, rank=frac)
        factors = layer.weight.layer_factors(())
        trainable = [f.detach().clone().requires_grad_(True) for f in factors]
        grad = torch.randn(out_f, in_f)
        net = layer.weight.network

        def rebuild(factors=factors, net=net) -> None:
            with torch.no_grad():
                functional.reconstruct_weight(factors, net)

        def rebuild_backward(trainable=trainable, net=net, grad=grad) -> None:
            functional.reconstruct_weight(trainable, net).backward(grad)

        for name, fn in (("rebuild", rebuild), ("rebuild+backward", rebuild_backward)):
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for variant in random.sample(["old", "new"], 2):
                    use(variant)
                    fn()
                    fn()
                    calls = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        fn()
                        calls.append(time.perf_counter() - t0)
                    times[variant].append(statistics.median(calls))
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{in_f}x{out_f} {fmt:6s} {frac:<4} {name:16s} old {old * 1e3:8.3f} ms "
                  f"new {new * 1e3:8.3f} ms new/old {new / old:.3f}", flush=True)


if __name__ == "__main__":
    main()
