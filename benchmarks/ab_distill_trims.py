"""A/B of distillation with and without returning free pages on growth, in one process.

    python benchmarks/ab_distill_trims.py [--size 6x384] [--vocab 30522] [--steps 30] [--pairs 3]

A random-weight BERT-style encoder (``compress_scale.build``) is converted to 50% with a
plain fit, then distilled as ``compress`` does it (block outputs as features, the
``'auto'`` activation bound, the teacher's outputs cached) from the same student copy,
``--pairs`` times each way in alternating order: with ``TrimOnGrowth`` (the library's
default) and with a stand-in that never trims; before each run the free pages are
returned, as ``compress`` does before distilling. Prints the seconds of every run, their
medians and how often each trimming run trimmed. Nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="6x384", help="LAYERSxHIDDEN")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=3)
    a = ap.parse_args(argv)

    import compress_scale
    import torch
    from torch import nn

    import tensorfold
    from tensorfold.convert._memory import TrimOnGrowth, release_free_memory
    from tensorfold.convert.planner import match_modules
    from tensorfold.pretrained import pipeline
    from tensorfold.pretrained.models import load
    from tensorfold.pretrained.tasks import task_for

    distill_module = importlib.import_module("tensorfold.convert.distill")
    layers, hidden = (int(x) for x in a.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="tf-ab-trims-"))
    info = compress_scale.build(layers, hidden, a.vocab, folder)
    loaded = load(str(folder), "encoder")
    task = task_for(loaded, 128, torch.device("cpu"))
    config = pipeline.CompressConfig(model_dir=str(folder), task="encoder", progress=False)
    batches = task.distill_batches(pipeline._split_data(config, task).distillation)
    teacher = loaded.model
    targets = pipeline.default_targets(teacher)
    names = match_modules(teacher, targets, None)
    shared = {id(m.weight): m.weight for m in teacher.modules() if isinstance(m, nn.Embedding)}
    base = copy.deepcopy(teacher, memo=shared)
    del shared
    tensorfold.tensorize(base, budget=0.5, targets=targets, progress=False)
    bound = pipeline.auto_activation_memory(base, info["model_bytes"])

    trimmers: list[TrimOnGrowth] = []

    class Counted(TrimOnGrowth):
        def __init__(self, margin: int) -> None:
            super().__init__(margin)
            trimmers.append(self)

    class Never:
        def __init__(self, margin: int) -> None:
            pass

        def __call__(self) -> bool:
            return False

    seconds: dict[str, list[float]] = {"trims on growth": [], "no trims": []}
    for pair in range(a.pairs):
        order = list(seconds) if pair % 2 == 0 else list(reversed(seconds))
        for kind in order:
            distill_module.TrimOnGrowth = Counted if kind == "trims on growth" else Never
            student = copy.deepcopy(base)
            options = pipeline.distill_options(config, student, teacher, names, a.steps)
            release_free_memory()  # as compress does before distilling
            t = time.perf_counter()
            pipeline.distill_task(task, student, teacher, batches, options, progress=False)
            seconds[kind].append(time.perf_counter() - t)
    distill_module.TrimOnGrowth = TrimOnGrowth
    print(f"{a.size}, vocabulary {a.vocab}, activation bound {bound:.2f}x the model")
    print(f"trims per trimming run: {[t.trims for t in trimmers]} of {a.steps} steps")
    for kind, values in seconds.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{kind}: {runs} s; median {statistics.median(values):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
