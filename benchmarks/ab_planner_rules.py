"""A/B of two planner rules, old and new plans compiled in one process.

    python benchmarks/ab_planner_rules.py --rule rebuild-layout [--threads 2] [--repeats 9]
    python benchmarks/ab_planner_rules.py --rule broadcast-bmm [--threads 2] [--repeats 10]

``rebuild-layout``: a rebuild's last step laid out by contiguous run (new) or by the flat
copy price (old); times the rebuild alone (``no_grad``) and rebuild + backward.
``broadcast-bmm``: mode products between two free blocks as a ``bmm`` with the factor
broadcast (new) or as permute copy + ``mm`` (old); times a factorized layer's inference
forward and training step at 32 and 1024 rows.

Only layers whose plan the rule changes are timed (shapes 1024x1024, 768x3072, 3072x768,
4096x4096 for broadcast-bmm; 1%/10% of the parameters; every format). Plan caches are
cleared between variants, which run in a random order each repeat; medians of the
per-repeat medians of 5 calls; prints the ratio new / old.

A 16 MB tensor is allocated and freed first: glibc serves a request at or above its
mmap threshold with fresh pages (about 1 ms of page faults per 4 MB here), and it
raises that threshold only once a larger block has been freed. Without this the
first cells measured page faults (Tucker 1% 1024x1024 rebuild: 2.5 ms instead of
0.3 ms for the same plan), as in a process that never held a large tensor.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

import tensorfold
from tensorfold import choice, functional, paths, steps
from tensorfold.formats import names

FORMATS = names()
FRACTIONS = (0.01, 0.1)
_COMPILE = steps.compile_path
_BROADCAST_SPLIT = steps.broadcast_split


def _flat_layout(*args, layout_by_run: bool = False, **kwargs):  # noqa: ARG001 - the old rule
    return _COMPILE(*args, **kwargs)


def use(rule: str, variant: str) -> None:
    """Install the new (as shipped) or old behaviour of ``rule`` and drop cached plans."""
    new = variant == "new"
    if rule == "rebuild-layout":
        steps.compile_path = _COMPILE if new else _flat_layout
    else:
        steps.broadcast_split = _BROADCAST_SPLIT if new else (lambda *a, **k: None)
    paths.contraction_plan.cache_clear()
    choice.rebuild_plan.cache_clear()
    choice.split_program.cache_clear()
    choice.layer_program.cache_clear()


def _plan_key(rule: str, layer: tensorfold.FactorizedLinear, rows: int) -> object:
    factors = layer.weight.layer_factors(())
    shapes = tuple(tuple(f.shape) for f in factors)
    if rule == "rebuild-layout":
        return choice.rebuild_plan(layer.weight.network, shapes, "cpu", 4).final_perm
    return choice.layer_program(layer.weight.network, shapes, rows).forward.steps


def changed(rule: str) -> list[tuple[int, int, str, float, int]]:
    shapes = [(1024, 1024), (768, 3072), (3072, 768)]
    rows_list = [32]
    if rule == "broadcast-bmm":
        shapes.append((4096, 4096))
        rows_list = [32, 1024]
    found = []
    for in_f, out_f in shapes:
        in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
        for fmt in FORMATS:
            for frac in FRACTIONS:
                layer = tensorfold.FactorizedLinear(
                    in_modes, out_modes, factorization=fmt, rank=frac
                )
                for rows in rows_list:
                    keys = []
                    for variant in ("old", "new"):
                        use(rule, variant)
                        keys.append(_plan_key(rule, layer, rows))
                    if keys[0] != keys[1]:
                        found.append((in_f, out_f, fmt, frac, rows))
    return found


def jobs(
    rule: str, in_f: int, out_f: int, fmt: str, frac: float, rows: int
) -> list[tuple[str, Callable[[], None]]]:
    in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        in_modes, out_modes, factorization=fmt, rank=frac, implementation="factorized"
    )
    net = layer.weight.network
    if rule == "rebuild-layout":
        factors = layer.weight.layer_factors(())
        trainable = [f.detach().clone().requires_grad_(True) for f in factors]
        grad = torch.randn(out_f, in_f)

        def rebuild() -> None:
            with torch.no_grad():
                functional.reconstruct_weight(factors, net)

        def rebuild_backward() -> None:
            functional.reconstruct_weight(trainable, net).backward(grad)

        return [("rebuild", rebuild), ("rebuild+backward", rebuild_backward)]
    x = torch.randn(rows, in_f)
    grad = torch.randn(rows, out_f)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def train() -> None:
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    return [("forward", forward), ("train step", train)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", choices=("rebuild-layout", "broadcast-bmm"), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.empty(2**22).fill_(0.0)  # 16 MB allocated and freed: see the docstring
    for in_f, out_f, fmt, frac, rows in changed(args.rule):
        for name, fn in jobs(args.rule, in_f, out_f, fmt, frac, rows):
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for variant in random.sample(["old", "new"], 2):
                    use(args.rule, variant)
                    fn()
                    fn()
                    calls = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        fn()
                        calls.append(time.perf_counter() - t0)
                    times[variant].append(statistics.median(calls))
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            where = f"{in_f}x{out_f} {fmt:6s} {frac:<4}"
            if args.rule == "broadcast-bmm":
                where += f" {rows:>4} rows"
            print(
                f"{where} {name:16s} old {old * 1e3:8.3f} ms new {new * 1e3:8.3f} ms "
                f"new/old {new / old:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
