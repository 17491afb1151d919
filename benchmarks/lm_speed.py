"""Prefill and decode speed of compressed causal LMs against the originals, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/lm_speed.py [--budgets 0.5 0.25] [--repeats 9]
        [--prefill-tokens 512] [--new-tokens 64] [--batch-sizes 1 8] [--threads 1]
        [--compile] [--quick] [--out DIR]

Subjects (``--models``): the two small trained models of ``benchmarks/train_lms.py``
(``gpt2``: ``benchmarks/models/gpt2-small-tf``, GPT-2 ``Conv1D`` layers; ``llama``:
``benchmarks/models/llama-small-tf``, Llama with grouped-query attention; 256 wide), run
that script first if they are missing; and two random-weight models of realistic width
built from configs, where decoding streams the weights from memory instead of the caches:
``gpt2-wide`` (GPT-2 small's shapes: 12 blocks of 768, 50,257 tokens) and ``llama-wide``
(TinyLlama's block shapes: 2,048 wide, MLP 5,632, 32 heads over 4 KV heads, 32,000 tokens;
8 blocks instead of 22). For each model and budget a deep copy has the linear layers of
its block stack (``*.h.*`` / ``*.layers.*``: attention and MLP projections, never the LM
head or the embeddings) converted: the trained models by
``tensorfold.tensorize(factorization='auto')``, calibrated on 16 chunks of 128 tokens of
the bundled corpus; the random ones by ``FactorizedLinear`` layers of ``--factorization``
(``'auto'``: ``'lowrank'``, what it picks on the trained ones) holding ``budget`` of each
layer's parameters, with random factors (speed depends on the shapes and ranks, not on how
well they were fitted; fitting 2,048 x 5,632 matrices would take minutes each). Every layer
is left as ``tensorize`` leaves it (``implementation='auto'``, the default inference
cache). The random models are fed random token ids.

Under ``torch.inference_mode()`` the original and the copies of one model are then timed in
the same loop, in a random order every repeat (medians over repeats):

* prefill: one forward over a prompt of ``--prefill-tokens`` tokens at batch 1 with
  ``use_cache=True`` (capped at the model's context length, which is 256 for these two);
* decode: greedy generation of ``--new-tokens`` tokens with the KV cache at each batch
  size, written by hand: prefill a 32-token prompt (not timed), then feed one token at a
  time with the returned KV cache (``cache=``, formerly ``past_key_values``); only the
  per-token steps are timed, argmax included.

Both use ``logits_to_keep=1`` as ``generate`` does (the LM head, never converted, runs for
the last position only). Memory: parameter bytes of each model, and what
``tensorfold.memory_report`` says its layers' inference caches hold after the run.
``--compile`` also times ``torch.compile``d versions of both (compiled original against
compiled compressed), skipped with a printed line where compiling fails. ``--quick``: one
budget, 2 repeats, short prompts, written to ``out/lm_speed``.

Writes ``lm_speed.md``, ``lm_speed.json`` and ``lm_speed.png`` to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tensorfold import FactorizedLinear, memory_report, tensorize
from tensorfold.convert._util import linear_view, match_modules, set_module
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences
from tensorfold.pretrained.data import token_chunks

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported below
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
MODELS = {"gpt2": ROOT / "models" / "gpt2-small-tf", "llama": ROOT / "models" / "llama-small-tf"}
# Random-weight subjects of realistic width: (model_type, config fields).
WIDE: dict[str, tuple[str, dict[str, int]]] = {
    "gpt2-wide": ("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}),
    "llama-wide": (
        "llama",
        {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
    ),
}
TARGETS = ["*.h.*", "*.layers.*"]  # the block stacks of GPT-2 and Llama
CAL_CHUNKS, CAL_LEN, DECODE_PROMPT = 16, 128, 32
MIB = 2.0**20


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def context_length(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def prefill(model: Callable[..., Any], ids: torch.Tensor) -> float:
    """Seconds of one forward over ``ids`` with the KV cache built."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    out.logits.argmax(-1)
    return time.perf_counter() - t0


def decode(model: Callable[..., Any], prompt: torch.Tensor, steps: int) -> float:
    """Seconds of ``steps`` greedy one-token steps after an (untimed) prefill of ``prompt``."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past = out.cache
    token = out.logits[:, -1:].argmax(-1)
    total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, cache=past, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        total += time.perf_counter() - t0
        past = out.cache
    return total


def random_model(model_type: str, fields: dict[str, int]) -> torch.nn.Module:
    """A causal LM of ``model_type`` with random weights, built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **fields)
    return AutoModelForCausalLM.from_config(config).eval()


def replace_random(
    model: torch.nn.Module, budget: float, factorization: str = "lowrank"
) -> list[FactorizedLinear]:
    """Replace the linear layers ``tensorize`` would take under ``TARGETS`` (``Conv1D``
    included) by layers of ``factorization`` holding ``budget`` of their parameters, with
    random factors."""
    new: list[FactorizedLinear] = []
    for name in match_modules(model, TARGETS, None):
        dense = linear_view(model.get_submodule(name))
        layer = FactorizedLinear(
            dense.in_features,
            dense.out_features,
            bias=dense.bias is not None,
            factorization=factorization,
            rank=budget,
            implementation="auto",
        )
        set_module(model, name, layer)
        new.append(layer)
    return new


def paths(model: torch.nn.Module, rows: int) -> Counter:
    """Which path each converted layer runs at ``rows`` rows in inference (as decided)."""
    count: Counter = Counter()
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            count[m.explain(rows).path] += 1
    return count


def fmt_count(count: Counter) -> str:
    return ", ".join(f"{n} {p}" for p, n in sorted(count.items()))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=[*MODELS, *WIDE], metavar="MODEL"
    )
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--factorization", default="auto")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decode batches")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny counts, out/")
    ap.add_argument("--out", default=None, help="default benchmarks/results (--quick: out/)")
    args = ap.parse_args()
    if args.quick:
        args.budgets = args.budgets[:1]
        args.repeats = min(args.repeats, 2)
        args.prefill_tokens = min(args.prefill_tokens, 64)
        args.new_tokens = min(args.new_tokens, 8)
    out_dir = Path(args.out or ("out/lm_speed" if args.quick else ROOT / "results"))
    missing = [
        str(MODELS[m])
        for m in args.models
        if m in MODELS and not (MODELS[m] / "config.json").exists()
    ]
    if missing:
        print(
            f"missing model folder(s): {', '.join(missing)}; "
            "run `python benchmarks/train_lms.py` first",
            file=sys.stderr,
        )
        sys.exit(2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cal_text, eval_text = calibration_and_evaluation_sentences(512, 512)
    results: list[dict[str, Any]] = []
    for key in args.models:
        if key in WIDE:
            original = random_model(*WIDE[key])
            n_prefill = min(args.prefill_tokens, context_length(original))
            ids = torch.randint(0, original.config.vocab_size, (max(args.batch_sizes), n_prefill))
            prefill_ids, decode_ids = ids[:1], ids[:, :DECODE_PROMPT]
        else:
            tok = AutoTokenizer.from_pretrained(MODELS[key])
            original = AutoModelForCausalLM.from_pretrained(MODELS[key]).eval()
            n_prefill = min(args.prefill_tokens, context_length(original))
            prefill_ids = token_chunks(eval_text, tok, n_prefill)[:1]
            decode_ids = token_chunks(eval_text, tok, DECODE_PROMPT)
        if n_prefill < args.prefill_tokens:
            print(f"{key}: context is {n_prefill} tokens; prefill prompt cut to it")
        prompts = {bs: decode_ids[:bs] for bs in args.batch_sizes}

        models: dict[str, Any] = {"original": original}
        info: dict[str, dict[str, Any]] = {}
        for budget in tqdm(args.budgets, desc=f"{key}: converting", unit="budget"):
            student = copy.deepcopy(original)
            t0 = time.perf_counter()
            if key in WIDE:
                form = "lowrank" if args.factorization == "auto" else args.factorization
                layers = replace_random(student, budget, form)
                kept = sum(m.weight.num_parameters() for m in layers) / sum(
                    m.in_features * m.out_features for m in layers
                )
                formats = dict(Counter(m.factorization for m in layers))
            else:
                cal_ids = token_chunks(cal_text, tok, CAL_LEN)[:CAL_CHUNKS]
                report = tensorize(
                    student,
                    budget=budget,
                    factorization=args.factorization,
                    targets=TARGETS,
                    calibration=[
                        {"input_ids": row[None], "attention_mask": torch.ones_like(row[None])}
                        for row in cal_ids
                    ],
                    progress=False,
                )
                kept, formats = report.kept, dict(Counter(lp.factorization for lp in report.layers))
            name = f"{budget:g}"
            models[name] = student.eval()
            info[name] = {
                "budget": budget,
                "kept": kept,
                "layers": sum(formats.values()),
                "formats": formats,
                "convert_s": time.perf_counter() - t0,
            }
        if args.compile:
            # One code object (the model class's forward) serves every compiled copy, and
            # the KV cache's strides change between prefill and decode: the default limit
            # of 8 graphs would leave later copies running eagerly.
            torch._dynamo.config.recompile_limit = 64
            for name in list(models):
                try:
                    # A copy of its own: no parameter or inference cache shared with the eager one.
                    models[f"{name} compiled"] = torch.compile(
                        copy.deepcopy(models[name]), dynamic=True
                    )
                except Exception as exc:  # noqa: BLE001 - any failure skips compile
                    print(f"{key}: torch.compile of {name} failed ({exc!r}); skipping")

        cases: dict[str, Callable[[Any], float]] = {
            "prefill": lambda m, ids=prefill_ids: prefill(m, ids)
        }
        for bs in args.batch_sizes:
            cases[f"decode b{bs}"] = lambda m, p=prompts[bs]: decode(m, p, args.new_tokens)
        times: dict[str, dict[str, list[float]]] = {c: {n: [] for n in models} for c in cases}
        with torch.inference_mode():
            for name in list(models):  # warm-up: paths, caches, compiled graphs
                for _ in range(2 if name.endswith("compiled") else 1):
                    try:
                        for run in cases.values():
                            run(models[name])
                    except Exception as exc:  # noqa: BLE001
                        if not name.endswith("compiled"):
                            raise
                        print(f"{key}: compiled {name} failed in warm-up ({exc!r}); skipping")
                        del models[name]
                        for c in cases:
                            del times[c][name]
                        break
            for r in tqdm(range(args.repeats), desc=f"{key}: timing", unit="repeat"):
                rng = random.Random(r)
                for case, run in cases.items():
                    for name in rng.sample(list(models), len(models)):
                        times[case][name].append(run(models[name]))
            picks = {
                name: {
                    "1 row": fmt_count(paths(models[name], 1)),
                    **{
                        f"{bs} rows": fmt_count(paths(models[name], bs))
                        for bs in args.batch_sizes
                        if bs != 1
                    },
                    f"{n_prefill} rows": fmt_count(paths(models[name], n_prefill)),
                }
                for name in info
            }
        med = {c: {n: statistics.median(v) for n, v in t.items()} for c, t in times.items()}
        base_bytes = param_bytes(original)
        for name in models:
            if name.startswith("original"):
                continue
            ref = "original compiled" if name.endswith("compiled") else "original"
            plain = name.removesuffix(" compiled")
            mem = memory_report(models[plain])
            row: dict[str, Any] = {
                "model": key,
                "variant": name,
                **info[plain],
                "compiled": name.endswith("compiled"),
                "prefill_tokens": n_prefill,
                "param_bytes": param_bytes(models[plain]),
                "cached_bytes": mem.cached_bytes,
                "original_param_bytes": base_bytes,
                "paths": picks[plain],
                "cases": {},
            }
            for case in cases:
                t_ref, t_new = med[case][ref], med[case][name]
                entry = {
                    "original_s": t_ref,
                    "compressed_s": t_new,
                    "speedup": t_ref / t_new,
                    "speedup_fastest": min(times[case][ref]) / min(times[case][name]),
                    "original_all_s": times[case][ref],
                    "compressed_all_s": times[case][name],
                }
                if case.startswith("decode"):
                    bs = int(case.split("b")[-1])
                    n_tok = bs * args.new_tokens
                    entry["original_tok_s"] = n_tok / t_ref
                    entry["compressed_tok_s"] = n_tok / t_new
                row["cases"][case] = entry
            results.append(row)
    load_after = os.getloadavg()

    machine = (
        f"{cpu_name()} ({platform.machine()}, {platform.system()} "
        f"{platform.release()}), {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
        f"`torch.inference_mode()`; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min)"
    )
    case_names = ["prefill"] + [f"decode b{bs}" for bs in args.batch_sizes]
    lines = [
        "# Compressed causal LMs: prefill and decode speed against the originals",
        "",
        f"Commit `{commit()}`. Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine}.  ",
        f"{args.repeats} interleaved repeats (random order each), medians. Prefill: one forward "
        f"at batch 1, `use_cache=True`. Decode: {args.new_tokens} greedy one-token steps with "
        f"the KV cache after a {DECODE_PROMPT}-token prompt; tokens/s counts every sequence "
        "of the batch. Speedup = original time / compressed time.",
        "",
        "| model | budget | linear params kept | prefill tokens | prefill ms (orig / comp) "
        "| prefill speedup | "
        + " | ".join(
            f"decode b{bs} tok/s (orig / comp) | decode b{bs} speedup" for bs in args.batch_sizes
        )
        + " | params MiB (orig / comp) | cached MiB | (params + cached) / orig params |",
        "|---|---|---|---|---|---|" + "---|---|" * len(args.batch_sizes) + "---|---|---|",
    ]
    for row in results:
        c = row["cases"]
        cells = [
            row["model"],
            row["variant"],
            f"{row['kept']:.1%}",
            str(row["prefill_tokens"]),
            f"{c['prefill']['original_s'] * 1e3:.2f} / {c['prefill']['compressed_s'] * 1e3:.2f}",
            f"{c['prefill']['speedup']:.2f}x",
        ]
        for bs in args.batch_sizes:
            d = c[f"decode b{bs}"]
            cells += [
                f"{d['original_tok_s']:.0f} / {d['compressed_tok_s']:.0f}",
                f"{d['speedup']:.2f}x",
            ]
        cells += [
            f"{row['original_param_bytes'] / MIB:.2f} / {row['param_bytes'] / MIB:.2f}",
            f"{row['cached_bytes'] / MIB:.2f}",
            f"{(row['param_bytes'] + row['cached_bytes']) / row['original_param_bytes']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | budget | formats ('auto') | 'auto' paths in the converted layers |",
        "|---|---|---|---|",
    ]
    for row in results:
        if row["compiled"]:
            continue
        forms = fmt_count(Counter(row["formats"]))
        where = "; ".join(f"{k}: {v}" for k, v in row["paths"].items())
        lines.append(f"| {row['model']} | {row['variant']} | {forms} | {where} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out_dir / "lm_speed.md", text)
    payload = {
        "command": " ".join(sys.argv),
        "commit": commit(),
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    atomic_write(out_dir / "lm_speed.json", json.dumps(payload, indent=1) + "\n")
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(results) + 2), 3.6))
    width = 0.8 / len(case_names)
    for j, case in enumerate(case_names):
        xs = [i + (j - (len(case_names) - 1) / 2) * width for i in range(len(results))]
        ax.bar(xs, [row["cases"][case]["speedup"] for row in results], width, label=case)
    ax.axhline(1.0, color="gray", lw=0.8)
    labels = [f"{row['model']}\nbudget {row['variant']}" for row in results]
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel("speedup over the original")
    ax.set_title("causal LMs, block linears tensorized (CPU, fp32)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_dir / "lm_speed.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
