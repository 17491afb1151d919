"""Train the two small causal language models that the compression benchmarks use.

No pretrained causal LM can be downloaded here, so this script makes two on the CPU:

* ``gpt2-small-tf``: ``GPT2LMHeadModel`` (``Conv1D`` layers, tied embeddings), 4 layers,
  width 256, 4 heads;
* ``llama-small-tf``: ``LlamaForCausalLM`` with grouped-query attention (8 query heads,
  2 key/value heads), 4 layers, width 256, SwiGLU MLP of 688, untied output layer.

Both share one byte-level BPE tokenizer (4,096 tokens, trained here with ``tokenizers``),
saved as a ``PreTrainedTokenizerFast`` whose ``<|endoftext|>`` is bos and eos (it is put in
front of every text) and ``<pad>`` the padding token, so ``AutoTokenizer.from_pretrained``
and ``AutoModelForCausalLM.from_pretrained`` load each folder offline.

Training text (the held-out texts below never enter it):

* the Python-documentation corpus of :mod:`tensorfold.pretrained.corpus`
  (``training_sentences(n_evaluation=512)``), in passages of up to 200 words; a share of
  every batch (``--pydocs-fraction``) comes from it;
* English man pages of this machine (``/usr/share/man/man[1-8]``, roff markup stripped, then
  the corpus cleaning), read in a fixed order until ``--max-man-words``. A sentence that is
  also in the other-source text or the Python-docs corpus is dropped. Without man pages the
  Python docs are the only training text.

Evaluation (perplexity per token, on 256-token blocks of the texts joined):

* ``pydocs``: the 512 evaluation sentences of
  ``calibration_and_evaluation_sentences`` (held out of training), in passages alike;
* ``other``: :func:`tensorfold.pretrained.other_text.other_source_documents` (license texts,
  copyright files, package descriptions).

Usage (from the repository root):
    python benchmarks/train_lms.py                # both models, about 4 minutes each
    python benchmarks/train_lms.py --quick        # smoke run, about 20 s of training each
    python benchmarks/train_lms.py --models llama --minutes 8

Training stops when the time budget is spent, and the learning-rate schedule (linear warmup,
then cosine decay) follows the fraction of the budget used, so a model gets the whole budget
however busy the cores are; ``--steps N`` trains exactly N steps instead, for a run that can
be repeated step for step. Each model is
written to a temporary folder beside its target and renamed into place only when complete,
with ``train_report.json`` (settings, steps, losses, perplexities).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tensorfold.files import atomic_write
from tensorfold.pretrained.corpus import (
    calibration_and_evaluation_sentences,
    english_sentences,
    training_sentences,
)
from tensorfold.pretrained.man_pages import MAN_DIR, chunk, man_documents
from tensorfold.pretrained.other_text import (
    other_source_documents,
    other_source_sentences,
)

# Read when transformers is first imported, which happens only inside the functions below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
EOS, PAD = "<|endoftext|>", "<pad>"
N_EVAL = 512

# ---- text ----

# ---- tokenizer ----


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos = tok.token_to_id(EOS)
    # Every text starts with <|endoftext|>, as every document does in the training stream.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=max_length,  # the models have no positions beyond the training length
    )


def blocks(tokenizer: Any, docs: list[str], seq_len: int) -> torch.Tensor:
    """The documents' tokens end to end (each led by eos), cut into ``seq_len`` blocks."""
    ids = [i for enc in tokenizer(docs, verbose=False)["input_ids"] for i in enc]
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit(f"only {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---- models ----


def build(kind: str, tokenizer: Any, seq_len: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "gpt2":
        gpt2 = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=seq_len,
            n_embd=256,
            n_layer=4,
            n_head=4,
            resid_pdrop=0.0,  # a few minutes of training: dropout only slows it
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return GPT2LMHeadModel(gpt2)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        **ids,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, batch: int = 16) -> dict[str, float]:
    model.eval()
    nll = 0.0
    count = 0
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    model.train()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to a tenth of ``peak`` as
    ``progress`` (the fraction of the steps or of the time budget used) goes to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    kind: str,
    tokenizer: Any,
    data: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = build(kind, tokenizer, args.seq_len)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_py = round(args.batch * args.pydocs_fraction) if len(data["man"]) else args.batch

    def batch() -> torch.Tensor:
        rows = [data["pydocs"][torch.randint(len(data["pydocs"]), (n_py,), generator=gen)]]
        if args.batch > n_py:
            idx = torch.randint(len(data["man"]), (args.batch - n_py,), generator=gen)
            rows.append(data["man"][idx])
        return torch.cat(rows)

    budget = 20.0 if args.quick else args.minutes * 60.0
    warmup = 5 if args.quick else args.warmup
    losses: list[float] = []
    start = time.perf_counter()
    if args.steps:
        bar = tqdm(total=args.steps, desc=kind, unit="step", dynamic_ncols=True)
    else:
        bar = tqdm(total=round(budget), desc=kind, unit="s", dynamic_ncols=True)
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, warmup)
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if args.steps:
            bar.update(1)
        else:
            bar.n = min(round(budget), round(time.perf_counter() - start))
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    report = {
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "train_seconds": round(seconds, 1),
        "tokens_seen": step * args.batch * args.seq_len,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "eval": {name: perplexity(model, data[f"eval_{name}"]) for name in ("pydocs", "other")},
    }
    return model, report


def save(model: torch.nn.Module, tokenizer: Any, report: dict[str, Any], target: Path) -> None:
    """Everything goes to a temporary folder beside ``target``, which then takes its place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    old = target.parent / f".{target.name}.old"
    try:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        atomic_write(tmp / "train_report.json", json.dumps(report, indent=2) + "\n")
        # Temporary files and folders are private (0600/0700); the saved model is not.
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=("gpt2", "llama"), default=["gpt2", "llama"])
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    ap.add_argument("--steps", type=int, default=None, help="exact step count (overrides time)")
    ap.add_argument("--quick", action="store_true", help="smoke run: ~20 s per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="blocks per step (more steps per minute)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; default: all cores, or 1 when other processes already load them",
    )
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps (5 with --quick)")
    ap.add_argument("--pydocs-fraction", type=float, default=0.25)
    ap.add_argument("--max-man-words", type=int, default=1_500_000)
    args = ap.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.pydocs_fraction <= 1:
        ap.error("--minutes must be > 0 and --pydocs-fraction in (0, 1]")

    if args.threads is None:
        # On cores that other processes keep busy, intra-op threads wait on each other and
        # one thread trains faster than several.
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
        args.threads = 1 if busy else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads} (load average {os.getloadavg()[0]:.1f})")

    t0 = time.perf_counter()
    pydocs_train = chunk(training_sentences(n_evaluation=N_EVAL), 200)
    pydocs_eval = chunk(calibration_and_evaluation_sentences(0, N_EVAL)[1], 200)
    other_eval = other_source_documents()
    excluded = {s.lower() for s in english_sentences()} | {
        s.lower() for s in other_source_sentences()
    }
    max_man = 60_000 if args.quick else args.max_man_words
    man, pages = man_documents(max_man, excluded) if MAN_DIR.is_dir() else ([], 0)
    print(
        f"text: {len(pydocs_train)} Python-docs passages, {len(man)} man-page passages "
        f"({pages} pages), held out: {len(pydocs_eval)} Python-docs and {len(other_eval)} "
        f"other-source passages ({time.perf_counter() - t0:.0f} s)"
    )
    tokenizer = train_tokenizer(pydocs_train + man, args.vocab, args.seq_len)
    data = {
        "pydocs": blocks(tokenizer, pydocs_train, args.seq_len),
        "man": blocks(tokenizer, man, args.seq_len) if man else torch.empty(0, args.seq_len),
        "eval_pydocs": blocks(tokenizer, pydocs_eval, args.seq_len),
        "eval_other": blocks(tokenizer, other_eval, args.seq_len),
    }
    print("blocks of", args.seq_len, "tokens:", {k: len(v) for k, v in data.items()})

    for kind in args.models:
        model, report = train(kind, tokenizer, data, args)
        report["settings"] = {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        }
        report["data_blocks"] = {k: len(v) for k, v in data.items()}
        report["man_pages"] = pages
        report["platform"] = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        }
        target = args.out / f"{kind}-small-tf"
        save(model, tokenizer, report, target)
        ev = report["eval"]
        print(
            f"{target}: {report['parameters'] / 1e6:.2f} M parameters, {report['steps']} steps, "
            f"perplexity held-out Python docs {ev['pydocs']['perplexity']:.2f}, "
            f"other source {ev['other']['perplexity']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
