"""How the pipeline's time and memory grow with model size: random BERT-style encoders.

    python benchmarks/compress_scale.py                       # 6 x 384 (then 12 x 768 if
                                                              # the first took < 6 minutes)
    python benchmarks/compress_scale.py --sizes 6x384 12x768  # both, unconditionally
    python benchmarks/compress_scale.py --sizes bert-base     # 12 x 768, BERT-base's 30,522
                                                              # tokens: 110 M parameters
    python benchmarks/compress_scale.py --quick               # smoke run: a 2 x 128 encoder
    python benchmarks/compress_scale.py --checkpoint-blocks   # distil with recomputed blocks
    python benchmarks/compress_scale.py --activation-memory 0 # no bound on distillation's
                                                              # activations (default: 'auto')

Each size is a ``BertModel`` built from its config with random weights (vocabulary of
8,000, ``bert-base``: 30,522; ``L x H`` = layers x hidden width, intermediate 4 H, H / 64
heads) and saved with
``save_pretrained`` beside a byte-level BPE tokenizer of the same vocabulary trained on the
bundled English corpus, in a temporary folder. Random weights make the quality figures
meaningless; only time and memory are the point.

Every compression runs in a fresh subprocess (``tensorfold.pretrained.compress`` with
``CompressConfig(task='encoder', budget=0.5, distill_steps=--distill-steps)`` and the
encoder defaults: 1,024 calibration and 512 held-out sentences), and its peak resident
memory is that child's ``ru_maxrss`` (``os.wait4`` returns the rusage of exactly that
child; ``resource.getrusage(RUSAGE_CHILDREN)`` gives the same figure for the largest child
so far and is recorded too). A second subprocess imports the libraries, loads the model
and runs it once on one batch of 32 of the longest calibration sentences: its peak
is the floor every run pays (Python, torch, transformers, the model, the math libraries'
first-call workspaces), so ``peak - floor`` is what compression itself adds. Reported per
size: parameters, model bytes (fp32 parameters and buffers), the pipeline's seconds per stage
(``result.seconds``), seconds per million parameters, peak RSS, peak / model bytes and
(peak - floor) / model bytes.

Where the peak is: while the compression runs, the parent reads the child's resident memory
(``VmRSS`` in ``/proc/<pid>/status``, Linux) every 0.25 s, and the child records when each
stage ended (loaded, planned, fitted and evaluated, distilled and evaluated). The JSON holds
that timeline per size; ``compress_scale.png`` plots it, with the floor and the target
(floor + 3x the model) drawn across.

Writes ``compress_scale.{md,json,png}`` to ``--out`` (default ``benchmarks/results``;
``--quick``: ``out/``, which git ignores), atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# How the first line the pipeline prints after each stage starts (the first match counts),
# and the stage it ends.
STAGES = [
    ("encoder model from", "loaded"),
    ("tensorfold plan:", "planned"),
    ("after layer-wise fitting", "fitted + evaluated"),
    ("after ", "distilled + evaluated"),
]
# name -> (layers, hidden width, vocabulary)
SIZES = {
    "2x128": (2, 128, 8000),
    "6x384": (6, 384, 8000),
    "12x768": (12, 768, 8000),
    "bert-base": (12, 768, 30522),
}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build(layers: int, hidden: int, vocab: int, folder: Path) -> dict[str, int]:
    """A random-weight ``BertModel`` and its tokenizer, saved in ``folder``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tensorfold.pretrained.corpus import english_sentences

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        pad_token_id=1,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    special = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        english_sentences(),
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    ).save_pretrained(folder)
    tensors = [*model.parameters(), *model.buffers()]
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layer." in n
    )
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "block_linear_parameters": linear,
    }


# ---- the two kinds of child process ------------------------------------------------------
def worker(
    model_dir: str,
    result: str,
    distill_steps: int,
    load_only: bool,
    checkpoint_blocks: bool,
    activation_memory: float | str,
) -> None:
    import torch

    if load_only:
        from tensorfold.pretrained.bundled import bundled_sentences
        from tensorfold.pretrained.models import load
        from tensorfold.pretrained.tasks import task_for

        t = time.perf_counter()
        loaded = load(model_dir, "encoder")
        out: dict[str, Any] = {"seconds": {"load": time.perf_counter() - t}}
        task = task_for(loaded, 128, torch.device("cpu"))
        longest = task.batches(bundled_sentences()[:1024])[-1]
        with torch.no_grad():
            task.forward(loaded.model, longest)
        del loaded
    else:
        from tensorfold.pretrained import CompressConfig, compress

        config = CompressConfig(
            model_dir=model_dir,
            task="encoder",
            budget=0.5,
            device="cpu",
            distill_steps=distill_steps,
            checkpoint_blocks=checkpoint_blocks,
            activation_memory=activation_memory or None,  # 0: no bound
            progress=False,
            seed=0,
        )
        marks: list[tuple[float, str]] = []

        def print_fn(line: str) -> None:
            print(line, flush=True)
            stage = next((stage for start, stage in STAGES if line.startswith(start)), None)
            if stage is not None and (not marks or marks[-1][1] != stage):
                marks.append((time.time(), stage))

        r = compress(config, print_fn=print_fn)
        out = {
            "marks": marks,
            "seconds": r.seconds,
            "counts": r.counts,
            "kept": r.report.kept,
            "distill_steps_done": r.distill_steps_done,
            "formats": sorted({lp.factorization for lp in r.report.layers}),
            "quality_after": {k: str(v) for k, v in r.after.items()},
        }
        if activation_memory == "auto":
            from tensorfold.pretrained.pipeline import auto_activation_memory

            model_bytes = sum(p.numel() * p.element_size() for p in r.teacher.parameters())
            out["activation_memory"] = auto_activation_memory(r.student, model_bytes)
    out["threads"] = torch.get_num_threads()
    out["self_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(result).write_text(json.dumps(out))


def sample_rss(pid: int, into: list[tuple[float, int]], stop: threading.Event) -> None:
    """Append (time, resident bytes) of process ``pid`` every 0.25 s until ``stop``."""
    while not stop.wait(0.25):
        try:
            with open(f"/proc/{pid}/status") as fh:
                kib = [int(x.split()[1]) for x in fh if x.startswith("VmRSS:")]
        except OSError:  # not Linux, or the child is gone
            return
        if kib:
            into.append((time.time(), kib[0] * 1024))


def in_child(
    args: list[str], timeline: list[tuple[float, int]] | None = None
) -> tuple[dict[str, Any], int, float]:
    """Run this script as a worker; its result, its peak RSS (KiB) and wall seconds. With
    ``timeline``, its resident memory is sampled into it as it runs."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args, "--result", result])
    stop = threading.Event()
    sampler = None
    if timeline is not None:
        timeline.append((time.time(), 0))  # the start
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, timeline, stop))
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    if sampler is not None:
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed with exit code {proc.returncode}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out, usage.ru_maxrss, wall


def measure(
    name: str, distill_steps: int, checkpoint_blocks: bool, activation_memory: float | str
) -> dict[str, Any]:
    layers, hidden, vocab = SIZES[name]
    with tempfile.TemporaryDirectory(prefix=f"tf-scale-{name}-") as tmp:
        folder = Path(tmp) / "model"
        t = time.perf_counter()
        info = build(layers, hidden, vocab, folder)
        build_s = time.perf_counter() - t
        floor, floor_kib, _ = in_child([str(folder), "--load-only"])
        load_before = os.getloadavg()[0]
        args = [str(folder), "--distill-steps", str(distill_steps)]
        args += ["--activation-memory", str(activation_memory)]
        samples: list[tuple[float, int]] = []
        args += ["--checkpoint-blocks"] * checkpoint_blocks
        res, peak_kib, wall = in_child(args, samples)
        children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak = peak_kib * 1024
    seconds = res["seconds"]
    return {
        "size": name,
        "layers": layers,
        "hidden": hidden,
        "intermediate": 4 * hidden,
        "vocab": vocab,
        **info,
        "build_seconds": build_s,
        "seconds": seconds,
        "wall_seconds_child": wall,
        "seconds_per_million_parameters": seconds["total"] / (info["parameters"] / 1e6),
        "fit_seconds_per_million_block_linear": seconds["fit"]
        / (info["block_linear_parameters"] / 1e6),
        "peak_rss_bytes": peak,
        "floor_rss_bytes": floor_kib * 1024,
        "rusage_children_max_bytes": children_kib * 1024,
        "peak_over_model": peak / info["model_bytes"],
        "peak_minus_floor_over_model": (peak - floor_kib * 1024) / info["model_bytes"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        **{k: res[k] for k in ("counts", "kept", "distill_steps_done", "formats", "threads")},
        "quality_after": res["quality_after"],
        # the activation bound distillation used, in model bytes ('auto' resolved)
        "activation_memory": res.get("activation_memory", activation_memory or None),
        # seconds from the child's start: resident bytes, and the end of each stage
        "timeline": [(round(t - samples[0][0], 2), b) for t, b in samples[1:]],
        "stage_ends": [(round(t - samples[0][0], 2), stage) for t, stage in res["marks"]],
    }


def _bound(multiple: float | str | None) -> str:
    return "none" if multiple is None else f"{float(multiple):.2f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mib = 1 << 20
    lines = [
        "# Pipeline scaling: random BERT-style encoders compressed to 50%",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`; machine: {meta['machine']}.  ",
        "Each compression in a fresh subprocess: `CompressConfig(task='encoder', budget=0.5, "
        f"distill_steps={meta['distill_steps']}"
        + (", checkpoint_blocks=True" if meta.get("checkpoint_blocks") else "")
        + f", activation_memory={meta.get('activation_memory') or None!r}"
        + ")`, default counts (calibration / distillation "
        "/ held-out sentences below). Peak = the child's `ru_maxrss`; floor = a child that "
        "imports and loads the model and runs it once on a batch of 32 long sentences.",
        "",
        "| size | params | model MiB | calib/distil/eval | load s | fit s | distill s | "
        "total s | s per M params | peak MiB | floor MiB | peak / model | "
        "(peak - floor) / model | activations / model | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, c = r["seconds"], r["counts"]
        lines.append(
            f"| {r['layers']}x{r['hidden']} | {r['parameters'] / 1e6:.1f} M | "
            f"{r['model_bytes'] / mib:.0f} | {c['calibration']}/{c['distillation']}/"
            f"{c['evaluation']} | {s['load']:.0f} | {s['fit']:.0f} | {s['distill']:.0f} | "
            f"{s['total']:.0f} | {r['seconds_per_million_parameters']:.1f} | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['floor_rss_bytes'] / mib:.0f} | "
            f"{r['peak_over_model']:.1f} | {r['peak_minus_floor_over_model']:.2f} | "
            f"{_bound(r.get('activation_memory'))} | "
            f"{r['load_average_before']:.1f}-{r['load_average_after']:.1f} |"
        )
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None)
    ap.add_argument("--distill-steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="smoke run: a 2 x 128 encoder")
    ap.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="distil with CompressConfig(checkpoint_blocks=True): block activations recomputed",
    )
    ap.add_argument(
        "--activation-memory",
        type=lambda text: text if text == "auto" else float(text),
        default="auto",
        help="CompressConfig(activation_memory=...): distillation's activation bound as a "
        "multiple of the model's bytes, or 'auto' (the default; 0: none)",
    )
    ap.add_argument("--out", type=Path, default=None)
    # Internal: the child processes.
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(
            a.worker[0],
            a.result,
            a.distill_steps,
            a.load_only,
            a.checkpoint_blocks,
            a.activation_memory,
        )
        return 0
    if a.out is None:
        a.out = HERE.parent / "out" if a.quick else HERE / "results"
    conditional = a.sizes is None and not a.quick
    sizes = ["2x128"] if a.quick else (a.sizes or ["6x384", "12x768"])
    if a.quick:
        a.distill_steps = 5
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    meta: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "distill_steps": a.distill_steps,
        "checkpoint_blocks": a.checkpoint_blocks,
        "activation_memory": a.activation_memory,
        "notes": [],
    }
    rows: list[dict[str, Any]] = []
    for name in sizes:
        if conditional and name == "12x768" and rows and rows[-1]["seconds"]["total"] >= 360:
            est = rows[-1]["seconds"]["total"] * 8
            meta["notes"].append(
                f"12x768 not run: 6x384 took {rows[-1]['seconds']['total']:.0f} s (>= 6 min). "
                f"Run `python benchmarks/compress_scale.py --sizes 12x768`; linear scaling "
                f"from 6x384 (about 8x the block parameters) suggests ~{est / 60:.0f} min."
            )
            continue
        print(f"== {name}", flush=True)
        rows.append(measure(name, a.distill_steps, a.checkpoint_blocks, a.activation_memory))
        print(json.dumps(rows[-1], indent=1), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "compress_scale_quick" if a.quick else "compress_scale"
    text = markdown(rows, meta)
    atomic_write_all(
        a.out / f"{stem}.md", text, a.out / f"{stem}.json", {"meta": meta, "rows": rows}
    )
    plot(rows, meta, a.out / f"{stem}.png")
    print(text)
    return 0


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Resident memory against time per size, the stages' ends marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tensorfold.files import atomic_savefig

    mib = 1 << 20
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        if r["timeline"]:
            t, b = zip(*r["timeline"], strict=True)
            ax.plot(t, [x / mib for x in b], lw=1, label="resident memory")
        floor, model = r["floor_rss_bytes"] / mib, r["model_bytes"] / mib
        ax.axhline(floor, color="gray", ls=":", lw=1, label="floor (libraries + model)")
        ax.axhline(floor + 3 * model, color="red", ls="--", lw=1, label="floor + 3x model")
        for t_end, stage in r["stage_ends"]:
            ax.axvline(t_end, color="black", lw=0.6)
            ax.text(t_end, ax.get_ylim()[1], f"{stage} ", rotation=90, fontsize=7, va="top")
        peak = r["peak_minus_floor_over_model"]
        ax.set_title(f"{r['layers']}x{r['hidden']}: (peak - floor) / model {peak:.1f}x")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"compress to 50%, {meta['distill_steps']} distillation steps ({meta['commit']})")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def atomic_write_all(md: Path, text: str, js: Path, data: dict[str, Any]) -> None:
    from tensorfold.files import atomic_write

    atomic_write(md, text)
    atomic_write(js, json.dumps(data, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
