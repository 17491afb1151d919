"""Which current Hugging Face architectures ``tensorfold compress`` handles.

    python benchmarks/hf_architectures.py                      # every architecture
    python benchmarks/hf_architectures.py --only gpt2,mixtral  # a subset
    python benchmarks/hf_architectures.py --list               # the names

Each architecture is built from its ``transformers`` config with random weights (2 layers,
hidden width 32, vocabulary 256, 64 positions) and saved with ``save_pretrained`` in a
temporary folder, beside a tiny BPE tokenizer trained on the generated sentences (text
models) or an image processor (vision models); the sentence-transformers entry wraps a tiny
BERT. The data is a text file of those sentences or a folder of random 40 x 40 images.

Per architecture, in subprocesses with ``OMP_NUM_THREADS=1`` and a time limit:

1. ``python -m tensorfold compress DIR --data DATA --budget 0.5 --distill-steps 3 ...``;
2. ``tensorfold.from_pretrained(OUT)`` and ``tensorfold.load(OUT, <the original reloaded>)``
   run on one batch: *pass* means compress exited 0, both outputs are finite and they are
   bit-identical.

Recorded: the task tensorfold detected, the exit code and the last line of stderr on a
failure, the number of converted layers and their linear parameters before and after
(``report.json``), the parameters of fused mixture-of-experts weights left dense (the
``left dense:`` line compress prints), and the seconds of each step. Random weights make
the quality figures meaningless; this is a compatibility check, not a quality benchmark.
An architecture this ``transformers`` does not have is reported as such.

Writes ``hf_architectures.{md,json}`` to ``--out`` (default ``benchmarks/results``),
atomically. The exit code is 0 even when some architectures fail (it is a report); 2 for an
unknown ``--only`` name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VOCAB = 256
SEQ_LEN = 32
TIMEOUT_S = 180
# The compress options every architecture gets (after MODEL_DIR --data DATA).
COMPRESS_OPTIONS = [
    "--budget", "0.5",
    "--distill-steps", "3",
    "--calibration-samples", "16",
    "--evaluation-samples", "8",
    "--seq-len", str(SEQ_LEN),
    "--no-progress",
]  # fmt: skip
# One thread per child: the figures are about whether it runs, and the machine may be shared.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
for _key, _value in CHILD_ENV.items():  # the parent too: no hub look-ups while building
    os.environ.setdefault(_key, _value)


@dataclass(frozen=True)
class Arch:
    """How to build one tiny model: ``transformers`` class names and config options."""

    kind: str  # 'causal-lm', 'encoder', 'vision' or 'sentence-embedding'
    model: str
    config: str
    options: dict[str, Any]
    # vision: the image processor's class name and options
    processor: tuple[str, dict[str, Any]] | None = None


BLOCK = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}
HEADS = {"num_attention_heads": 4}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}
# Token ids follow the tokenizer's special tokens: 1 [PAD], 2 [CLS], 3 [SEP], 4 <|endoftext|>.
LM = {"vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 4, "eos_token_id": 4}
ENC = {"vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 1}
# RoBERTa-style position ids start after the padding index.
ENC_OFFSET = {**ENC, "max_position_embeddings": 66}
SQUARE = {"height": 32, "width": 32}


def lm(model: str, config: str, **options: Any) -> Arch:
    return Arch("causal-lm", model, config, options)


def encoder(model: str, config: str, **options: Any) -> Arch:
    return Arch("encoder", model, config, options)


def vision(model: str, config: str, processor: str, **processor_options: Any) -> Arch:
    options = dict(BLOCK, **HEADS, image_size=32, patch_size=8)
    return Arch("vision", model, config, options, (processor, processor_options))


ARCHS: dict[str, Arch] = {
    # causal LMs
    "gpt2": lm("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=4, n_positions=64,
               **LM),
    "llama": lm("LlamaForCausalLM", "LlamaConfig", **BLOCK, **GQA, **LM),
    "qwen2": lm("Qwen2ForCausalLM", "Qwen2Config", **BLOCK, **GQA, **LM),
    "qwen3": lm("Qwen3ForCausalLM", "Qwen3Config", **BLOCK, **GQA, **LM, head_dim=8),
    "qwen3_moe": lm("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **BLOCK, **GQA, **LM, head_dim=8,
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mistral": lm("MistralForCausalLM", "MistralConfig", **BLOCK, **GQA, **LM, head_dim=8),
    "mixtral": lm("MixtralForCausalLM", "MixtralConfig", **BLOCK, **GQA, **LM, head_dim=8,
                  num_local_experts=4, num_experts_per_tok=2),
    "phi": lm("PhiForCausalLM", "PhiConfig", **BLOCK, **HEADS, **LM),
    "phi3": lm("Phi3ForCausalLM", "Phi3Config", **BLOCK, **GQA, **LM, pad_token_id=1),
    "gemma": lm("GemmaForCausalLM", "GemmaConfig", **BLOCK, **GQA, **LM, head_dim=8,
                pad_token_id=1),
    "gemma2": lm("Gemma2ForCausalLM", "Gemma2Config", **BLOCK, **GQA, **LM, head_dim=8,
                 pad_token_id=1, query_pre_attn_scalar=8, sliding_window=16),
    "gemma3_text": lm("Gemma3ForCausalLM", "Gemma3TextConfig", **BLOCK, **GQA, **LM, head_dim=8,
                      pad_token_id=1, query_pre_attn_scalar=8, sliding_window=16),
    "gpt_neox": lm("GPTNeoXForCausalLM", "GPTNeoXConfig", **BLOCK, **HEADS, **LM),
    "opt": lm("OPTForCausalLM", "OPTConfig", num_hidden_layers=2, hidden_size=32, ffn_dim=64,
              word_embed_proj_dim=32, pad_token_id=1, **HEADS, **LM),
    "falcon": lm("FalconForCausalLM", "FalconConfig", num_hidden_layers=2, hidden_size=32,
                 **HEADS, **LM),
    "bloom": lm("BloomForCausalLM", "BloomConfig", n_layer=2, hidden_size=32, n_head=4,
                vocab_size=VOCAB, bos_token_id=4, eos_token_id=4, pad_token_id=1),
    "gptj": lm("GPTJForCausalLM", "GPTJConfig", n_layer=2, n_embd=32, n_head=4, n_positions=64,
               rotary_dim=4, vocab_size=VOCAB, bos_token_id=4, eos_token_id=4),
    "codegen": lm("CodeGenForCausalLM", "CodeGenConfig", n_layer=2, n_embd=32, n_head=4,
                  n_positions=64, n_ctx=64, rotary_dim=4, vocab_size=VOCAB, bos_token_id=4,
                  eos_token_id=4),
    "stablelm": lm("StableLmForCausalLM", "StableLmConfig", **BLOCK, **GQA, **LM),
    "starcoder2": lm("Starcoder2ForCausalLM", "Starcoder2Config", **BLOCK, **GQA, **LM),
    "olmo2": lm("Olmo2ForCausalLM", "Olmo2Config", **BLOCK, **GQA, **LM, pad_token_id=1),
    "cohere": lm("CohereForCausalLM", "CohereConfig", **BLOCK, **GQA, **LM, pad_token_id=1),
    "granite": lm("GraniteForCausalLM", "GraniteConfig", **BLOCK, **GQA, **LM),
    "smollm3": lm("SmolLM3ForCausalLM", "SmolLM3Config", **BLOCK, **GQA, **LM, pad_token_id=1),
    # multi-head latent attention at width 32; the first layer dense, the second routed
    # experts beside a shared one
    "deepseek_v3": lm("DeepseekV3ForCausalLM", "DeepseekV3Config", **BLOCK, **GQA, **LM,
                      q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                      v_head_dim=8, head_dim=4, n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                      n_group=1, topk_group=1),
    # text encoders
    "bert": encoder("BertModel", "BertConfig", **BLOCK, **HEADS, **ENC),
    "roberta": encoder("RobertaModel", "RobertaConfig", **BLOCK, **HEADS, **ENC_OFFSET),
    "xlm_roberta": encoder("XLMRobertaModel", "XLMRobertaConfig", **BLOCK, **HEADS, **ENC_OFFSET),
    "distilbert": encoder("DistilBertModel", "DistilBertConfig", n_layers=2, dim=32,
                          hidden_dim=64, n_heads=4, **ENC),
    "albert": encoder("AlbertModel", "AlbertConfig", **BLOCK, **HEADS, **ENC, embedding_size=16),
    "electra": encoder("ElectraModel", "ElectraConfig", **BLOCK, **HEADS, **ENC,
                       embedding_size=32),
    "deberta_v2": encoder("DebertaV2Model", "DebertaV2Config", **BLOCK, **HEADS, **ENC),
    "mpnet": encoder("MPNetModel", "MPNetConfig", **BLOCK, **HEADS, **ENC_OFFSET),
    "modernbert": encoder("ModernBertModel", "ModernBertConfig", **BLOCK, **HEADS, **ENC,
                          global_attn_every_n_layers=2, local_attention=16, bos_token_id=2,
                          eos_token_id=3, cls_token_id=2, sep_token_id=3),
    # vision encoders (32 x 32 images)
    "vit": vision("ViTModel", "ViTConfig", "ViTImageProcessor", size=SQUARE),
    "deit": vision("DeiTModel", "DeiTConfig", "DeiTImageProcessor", size=SQUARE,
                   crop_size=SQUARE),
    "dinov2": vision("Dinov2Model", "Dinov2Config", "BitImageProcessor",
                     size={"shortest_edge": 32}, crop_size=SQUARE),
    "clip_vision": vision("CLIPVisionModel", "CLIPVisionConfig", "CLIPImageProcessor",
                          size={"shortest_edge": 32}, crop_size=SQUARE),
    "siglip_vision": vision("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor",
                            size=SQUARE),
    "swin": Arch("vision", "SwinModel", "SwinConfig",
                 dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                      window_size=4),
                 ("ViTImageProcessor", {"size": SQUARE})),
    # a sentence-transformers directory: a tiny BERT and mean pooling
    "sentence_transformers_bert": Arch("sentence-embedding", "BertModel", "BertConfig",
                                       dict(BLOCK, **HEADS, **ENC)),
}  # fmt: skip


class Unavailable(Exception):
    """The installed libraries do not have what an architecture needs."""


# ---- data and models -----------------------------------------------------------------------
# Words of the generated sentences.
# fmt: off
_WHO = ("the engineer", "a small robot", "our teacher", "the orchestra", "a curious cat",
        "each student", "the city council", "my neighbour", "the night shift", "a tired pilot")
_DOES = ("repairs", "describes", "carries", "ignores", "paints", "measures", "returns",
         "questions", "borrows", "celebrates")
_WHAT = ("the broken clock", "a long letter", "the heavy door", "three ripe tomatoes",
         "the failing test", "an old novel", "the quiet harbour", "a new budget", "the spare key",
         "a paper map")
_WHEN = ("before lunch.", "at midnight.", "after the storm.", "with great care.",
         "on a rainy Tuesday.", "for the second time.", "without any help.", "near the station.")
# fmt: on


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` short, varied English sentences (seeded): enough structure for a BPE vocabulary
    of 256 and for the calibration, distillation and held-out parts of the split."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_WHO).capitalize()} {rng.choice(_DOES)} {rng.choice(_WHAT)} "
        f"{rng.choice(_WHEN)}"
        for _ in range(n)
    ]


def write_data(root: Path) -> tuple[Path, Path]:
    """A text file of sentences and a folder of random RGB images under ``root``."""
    import numpy as np
    from PIL import Image

    text = root / "text.txt"
    text.write_text("\n".join(sentences(200)) + "\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # 16 calibration + 8 held-out, the rest for distillation
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:02d}.png")
    return text, images


def _transformers_class(name: str) -> Any:
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        raise Unavailable(f"not in this transformers ({name})") from None


def save_tokenizer(folder: Path, causal: bool) -> None:
    """A BPE tokenizer of ``VOCAB`` tokens trained on the generated sentences."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "<|endoftext|>", "[MASK]"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False)
    tok.train_from_iterator(sentences(200), trainer)
    tokens: dict[str, str] = (
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
        if causal
        else {
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", **tokens
    ).save_pretrained(folder)


def build(arch: Arch, folder: Path) -> None:
    """Save ``arch`` with random weights, and its tokenizer or image processor, in ``folder``."""
    import torch

    torch.manual_seed(0)
    config = _transformers_class(arch.config)(**arch.options)
    model = _transformers_class(arch.model)(config)
    if arch.kind == "sentence-embedding":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise Unavailable("sentence-transformers is not installed") from None
        try:  # sentence-transformers 6; ``models`` is its deprecated name
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        except ImportError:
            from sentence_transformers.models import Pooling, Transformer
        inner = folder.with_name(folder.name + "-inner")
        model.save_pretrained(inner)
        save_tokenizer(inner, causal=False)
        encoder = Transformer(str(inner), max_seq_length=SEQ_LEN)
        if hasattr(encoder, "get_embedding_dimension"):  # sentence-transformers 6
            width = encoder.get_embedding_dimension()
        else:
            width = encoder.get_word_embedding_dimension()
        pooling = Pooling(width, "mean")
        SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(folder))
        shutil.rmtree(inner)
        return
    model.save_pretrained(folder)
    if arch.processor is not None:
        name, options = arch.processor
        _transformers_class(name)(**options).save_pretrained(folder)
    else:
        save_tokenizer(folder, causal=arch.kind == "causal-lm")


# ---- the reload check (run in a child process) ---------------------------------------------
def check_reload(original_dir: str, out_dir: str, data: str) -> dict[str, Any]:
    """Run ``from_pretrained(out_dir)`` and ``load(out_dir, <original>)`` on one batch."""
    import torch

    import tensorfold
    from tensorfold.convert._util import tensors_of  # a ModelOutput is a dict
    from tensorfold.nn.cache import InferenceCache
    from tensorfold.pretrained import models
    from tensorfold.pretrained.tasks import task_for

    torch.set_num_threads(1)
    # Both models must take the same path through every layer: a timed tie-break could
    # pick differently in each and make equal weights differ in the last bits.
    InferenceCache.measure_ties = False
    original = models.load(original_dir)
    task = task_for(original, SEQ_LEN, torch.device("cpu"))
    batch = task.batches(task.samples(data)[:4])[0]
    rebuilt = tensorfold.from_pretrained(out_dir)
    loaded = tensorfold.load(out_dir, original.model)
    with torch.no_grad():
        a = tensors_of(task.forward(rebuilt, batch))
        b = tensors_of(task.forward(loaded, batch))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return {"outputs": [len(a), len(b)], "finite": False, "identical": False}
    floats = [(x, y) for x, y in zip(a, b, strict=True) if x.is_floating_point()]
    return {
        "outputs": len(a),
        "finite": bool(floats) and all(bool(torch.isfinite(x).all()) for x, _ in floats),
        "identical": all(torch.equal(x, y) for x, y in zip(a, b, strict=True)),
        "max_abs_diff": max((float((x - y).abs().max()) for x, y in floats), default=None),
    }


# ---- one architecture ----------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str
    status: str = "not run"
    passed: bool = False
    task: str | None = None  # what tensorfold detected (report.json)
    compress_rc: int | None = None
    error: str | None = None  # the last line of stderr on a failure
    layers_converted: int | None = None
    linear_params_before: int | None = None
    linear_params_after: int | None = None
    moe_params_left_dense: int | None = None
    reload: dict[str, Any] | None = None
    build_seconds: float = 0.0
    compress_seconds: float | None = None
    reload_seconds: float | None = None
    stderr_tail: list[str] = field(default_factory=list)


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    """(exit code or None on a timeout, stdout, stderr, seconds) of ``cmd``."""
    t = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV}, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, "", "", time.perf_counter() - t
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _count(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text, re.MULTILINE)
    return int(match.group(1).replace(",", "")) if match else None


def measure(name: str, work: Path, text: Path, images: Path, timeout: float) -> Row:
    arch = ARCHS[name]
    row = Row(name, arch.kind)
    model_dir, out_dir = work / name, work / f"{name}-compressed"
    data = images if arch.kind == "vision" else text
    t = time.perf_counter()
    try:
        build(arch, model_dir)
    except Unavailable as exc:
        row.status = str(exc)
        return row
    except Exception as exc:  # a config this transformers rejects, say: reported, not fatal
        row.status, row.error = "build failed", f"{type(exc).__name__}: {exc}"
        return row
    finally:
        row.build_seconds = time.perf_counter() - t

    cmd = [sys.executable, "-m", "tensorfold", "compress", str(model_dir), "--data", str(data)]
    rc, stdout, stderr, row.compress_seconds = _run(
        [*cmd, *COMPRESS_OPTIONS, "--out", str(out_dir)], timeout
    )
    row.compress_rc = rc
    if rc != 0:
        row.status = "compress timed out" if rc is None else f"compress failed (exit {rc})"
        row.error = f"no result in {timeout:.0f} s" if rc is None else _last_line(stderr)
        row.stderr_tail = stderr.splitlines()[-20:]
        return row
    report = json.loads((out_dir / "report.json").read_text())
    row.task = report.get("task")
    row.layers_converted = len(report.get("layers", []))
    row.linear_params_before = report.get("params_before")
    row.linear_params_after = report.get("params_after")
    if row.linear_params_before is None:  # an older report: the printed plan has them
        row.linear_params_before = _count(r"^linear parameters: ([\d,]+) ->", stdout)
        row.linear_params_after = _count(r"^linear parameters: [\d,]+ -> ([\d,]+)", stdout)
    row.moe_params_left_dense = _count(r"^left dense: ([\d,]+) parameters", stdout) or 0

    rc, stdout, stderr, row.reload_seconds = _run(
        [sys.executable, __file__, "--check", str(model_dir), str(out_dir), str(data)], timeout
    )
    if rc != 0:
        row.status = "reload timed out" if rc is None else f"reload failed (exit {rc})"
        row.error = f"no result in {timeout:.0f} s" if rc is None else _last_line(stderr)
        row.stderr_tail = stderr.splitlines()[-20:]
        return row
    row.reload = json.loads(_last_line(stdout))
    row.passed = bool(row.reload["identical"] and row.reload["finite"])
    if row.passed:
        row.status = "pass"
    else:
        row.status = "reload differs" if not row.reload["identical"] else "non-finite output"
    return row


# ---- report --------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# Which Hugging Face architectures `tensorfold compress` handles",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`; transformers {meta['transformers']}, torch "
        f"{meta['torch']}, sentence-transformers {meta['sentence_transformers']}; machine: "
        f"{meta['machine']}.  ",
        "Each model has random weights from its config (2 layers, hidden width 32, "
        f"vocabulary {VOCAB}, 64 positions), a BPE tokenizer trained on generated sentences "
        "or an image processor, and is compressed by "
        f"`python -m tensorfold compress DIR --data DATA {' '.join(COMPRESS_OPTIONS)} "
        f"--out OUT` (`OMP_NUM_THREADS=1`, {meta['timeout_s']:.0f} s limit). *Reload "
        "identical*: `tensorfold.from_pretrained(OUT)` and `tensorfold.load(OUT, original)` "
        "give finite, bit-identical outputs on one batch of 4 samples. *Pass* = compress "
        "exited 0 and the reload is identical. *MoE left dense*: parameters of fused "
        "mixture-of-experts weights, which compress leaves dense and outside the budget. "
        "Random weights: no quality figures.",
        "",
        f"**{meta['summary']}**",
        "",
        "| architecture | task | result | converted layers | linear params before -> after | "
        "MoE left dense | reload identical | compress s | reload s | failure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        task = r.task or r.kind
        if r.task is not None and r.task != r.kind:
            task += f" (expected {r.kind})"
        params = (
            f"{r.linear_params_before:,} -> {r.linear_params_after:,}"
            if r.linear_params_before is not None and r.linear_params_after is not None
            else "-"
        )
        identical = None if r.reload is None else ("yes" if r.reload["identical"] else "no")
        secs = [None if s is None else f"{s:.1f}" for s in (r.compress_seconds, r.reload_seconds)]
        error = None if r.error is None else r.error[:160] + ("..." if len(r.error) > 160 else "")
        cells = [
            r.name,
            task,
            r.status,
            r.layers_converted,
            params,
            r.moe_params_left_dense,
            identical,
            *secs,
            error,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> str:
    passed = sum(r.passed for r in rows)
    missing = sum(r.status.startswith("not in this transformers") for r in rows)
    text = f"{passed} of {len(rows)} pass"
    return text + (f" ({missing} not in this transformers)" if missing else "")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    # Figures from a tree with uncommitted changes to tracked files say so.
    return commit + (" + local changes" if git("diff", "--quiet", "HEAD").returncode else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated architectures (see --list)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where the report goes")
    ap.add_argument("--list", action="store_true", help="print the architectures and exit")
    ap.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help="seconds per compress / reload child"
    )
    # Internal: the reload check's child process.
    ap.add_argument("--check", nargs=3, metavar=("ORIGINAL", "OUT", "DATA"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.check:
        print(json.dumps(check_reload(*a.check)))
        return 0
    if a.list:
        for name, arch in ARCHS.items():
            print(f"{name:28} {arch.kind:20} {arch.model}")
        return 0
    names = list(ARCHS)
    if a.only is not None:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ARCHS]
        if unknown or not names:
            what = ", ".join(unknown) or "(none given)"
            print(
                f"hf_architectures.py: unknown architecture: {what} (see --list)", file=sys.stderr
            )
            return 2

    import torch

    from tensorfold.files import atomic_write

    torch.set_num_threads(1)  # building the tiny models needs no more
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    meta: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": _commit(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sentence_transformers": _version("sentence-transformers"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "compress_options": COMPRESS_OPTIONS,
        "timeout_s": a.timeout,
    }
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tf-hf-architectures-") as tmp:
        root = Path(tmp)
        text, images = write_data(root)
        for name in names:
            work = root / name
            work.mkdir()
            try:
                row = measure(name, work, text, images, a.timeout)
            except Exception as exc:  # a bug here must not lose the other rows
                row = Row(name, ARCHS[name].kind, "benchmark error", error=repr(exc))
            shutil.rmtree(work, ignore_errors=True)  # tiny, but 40 of them add up
            rows.append(row)
            took = (row.compress_seconds or 0) + (row.reload_seconds or 0)
            print(f"{name:28} {row.status:28} {took:6.1f} s", flush=True)
    meta["summary"] = summary(rows)
    meta["seconds"] = time.perf_counter() - start
    text_md = markdown(rows, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out / "hf_architectures.md", text_md)
    data = {"meta": meta, "rows": [asdict(r) for r in rows]}
    atomic_write(a.out / "hf_architectures.json", json.dumps(data, indent=1) + "\n")
    print(text_md)
    print(f"wrote {a.out / 'hf_architectures.md'} and .json ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
