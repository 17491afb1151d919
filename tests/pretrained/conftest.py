"""Tiny random-weight Hugging Face model directories, built from configs (seconds each)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _no_timed_tie_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check mechanics on tiny layers; timing contested choices only costs time."""
    from tensorfold.nn.cache import InferenceCache

    monkeypatch.setattr(InferenceCache, "measure_ties", False)


VOCAB = 256
KINDS = ("gpt2", "llama", "qwen2", "falcon", "bert", "vit")
TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A compressed model should behave like the original on new text.",
    "Every layer keeps a fraction of its parameters in factorized form.",
    "Calibration data comes from one source and evaluation from another.",
] * 8


def _tokenizer(folder: Path, bos_eos: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "<|endoftext|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        **(
            {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
            if bos_eos
            else {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        ),
    )
    fast.save_pretrained(folder)


def build(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=4,
                eos_token_id=4,
            )
        )
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **small,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                bos_token_id=4,
                eos_token_id=4,
            )
        )
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                **small,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                bos_token_id=4,
                eos_token_id=4,
            )
        )
    elif kind == "falcon":  # its projections are FalconLinear, a subclass of nn.Linear
        model = transformers.FalconForCausalLM(
            transformers.FalconConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                bos_token_id=4,
                eos_token_id=4,
            )
        )
    elif kind == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(
                **small, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1
            )
        )
    elif kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**small, image_size=32, patch_size=8))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    if kind == "vit":
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        _tokenizer(folder, bos_eos=kind != "bert")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(f"{line} Sample number {i}." for i, line in enumerate(TEXT * 4)))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    return folder
