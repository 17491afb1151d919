"""Compressing Hugging Face models end to end: every kind, the checkpoint, the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorfold
from tensorfold import cli
from tensorfold.convert._util import call_model, is_conv1d
from tensorfold.pretrained import CompressConfig, compress, from_pretrained, models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(
    seq_len=16, calibration_samples=8, evaluation_samples=4, distill_steps=3, progress=False
)


def _config(model_dir: Path, out: Path | None, data: Path, **kw: object) -> CompressConfig:
    return CompressConfig(
        model_dir=str(model_dir),
        out=None if out is None else str(out),
        data=str(data),
        **{**SMALL, **kw},
    )  # type: ignore[arg-type]


def _probe(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    ids = torch.randint(5, 200, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "falcon", "bert", "vit"])
def test_compress_save_and_from_pretrained_round_trip(
    kind: str,
    tiny_model: Callable[[str], Path],
    text_file: Path,
    image_folder: Path,
    tmp_path: Path,
) -> None:
    data = image_folder if kind == "vit" else text_file
    result = compress(_config(tiny_model(kind), tmp_path / "out", data), print_fn=lambda s: None)
    assert abs(result.report.kept - 0.5) <= 0.02
    assert result.reload_verified
    out = tmp_path / "out"
    for name in (
        "config.json",
        "model.safetensors",
        "tensorfold.json",
        "report.txt",
        "report.json",
        "report.png",
    ):
        assert (out / name).is_file(), name
    loaded = from_pretrained(out)
    assert not any(
        is_conv1d(m) or type(m) is nn.Linear and "layer" in n
        for n, m in loaded.named_modules()
        if ".h." in n or "layers." in n
    )
    batch = _probe(kind)
    for (name, a), b in zip(
        loaded.state_dict().items(), result.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
        assert a.stride() == b.stride(), name  # the layout ('lowrank''s U k-major) too
    assert any(not t.is_contiguous() for t in loaded.state_dict().values())
    torch.testing.assert_close(_out(loaded, batch), _out(result.student, batch))
    assert (out / "report.png").stat().st_size > 1000
    assert "tensorfold report" in (out / "report.txt").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["counts"]["calibration"] == 8 and summary["counts"]["evaluation"] == 4
    held = summary["after"]["held-out"]
    assert ("perplexity_ratio" in held) == (kind in ("gpt2", "llama", "qwen2", "falcon"))
    # The original layers' parameter count is what the plan says it was.
    original = models.load(tiny_model(kind)).model
    # The teacher is the original, untouched; the student shares only its embeddings.
    for (name, a), b in zip(
        result.teacher.state_dict().items(), original.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    embeddings = [m.weight for m in result.teacher.modules() if isinstance(m, nn.Embedding)]
    assert embeddings or kind == "vit"  # ViT embeds patches with a convolution
    student_params = {id(p) for p in result.student.parameters()}
    assert all(id(w) in student_params for w in embeddings)
    shared = student_params & {id(p) for p in result.teacher.parameters()}
    assert shared == {id(w) for w in embeddings}
    names = [lp.name for lp in result.report.layers]
    assert all(
        n.startswith(("transformer.h.", "model.layers.", "encoder.layer.", "layers."))
        for n in names
    )
    assert sum(lp.params_before for lp in result.report.layers) == sum(
        original.get_submodule(n).weight.numel() for n in names
    )


def test_gpt2_conv1d_is_planned_and_lm_head_is_not(tiny_model: Callable[[str], Path]) -> None:
    model = models.load(tiny_model("gpt2")).model
    plan = tensorfold.plan(model, budget=0.5)
    names = [lp.name for lp in plan.layers]
    assert len(names) == 8 and "lm_head" not in names
    assert all(is_conv1d(model.get_submodule(n)) for n in names)
    # Named explicitly, the head is converted too.
    assert [lp.name for lp in tensorfold.plan(model, budget=0.5, targets="lm_head").layers] == [
        "lm_head"
    ]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "falcon", "bert", "vit"])
def test_full_rank_tensorize_matches_the_original(
    kind: str, tiny_model: Callable[[str], Path]
) -> None:
    """Exact ranks (the full matrix rank) reproduce the model to float tolerance, with
    tokenizer-style dict batches passed as keywords."""
    model = models.load(tiny_model(kind)).model.double()
    batches = [_probe(kind) for _ in range(2)]
    batches = [
        {k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches
    ]
    ref = _out(model, batches[0])
    tensorfold.tensorize(
        model, budget=None, rank=10_000, factorization="tt", calibration=batches, progress=False
    )
    assert any(isinstance(m, tensorfold.FactorizedLinear) for m in model.modules())
    torch.testing.assert_close(_out(model, batches[0]), ref, rtol=1e-7, atol=1e-8)


def test_load_accepts_the_output_directory(
    tiny_model: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    result = compress(
        _config(tiny_model("llama"), tmp_path / "out", text_file), print_fn=lambda s: None
    )
    fresh = models.load(tiny_model("llama")).model
    tensorfold.load(tmp_path / "out", fresh)
    batch = _probe("llama")
    torch.testing.assert_close(_out(fresh, batch), _out(result.student, batch))


def test_call_model_passes_mappings_the_way_each_model_takes_them() -> None:
    class TakesMapping(nn.Module):
        def forward(self, input: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: A002
            return input["x"] * 2

    class TakesKeywords(nn.Module):
        def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
            assert x is not None
            return x * 3

    x = torch.ones(2)
    assert torch.equal(call_model(TakesMapping(), {"x": x}), x * 2)
    assert torch.equal(call_model(TakesKeywords(), {"x": x}), x * 3)


# ---- interruption ------------------------------------------------------------------------
def test_an_interrupted_write_leaves_no_directory(
    tiny_model: Callable[[str], Path],
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.pretrained import checkpoint

    def interrupted(*args: object, **kwargs: object) -> None:
        (args[2] / "config.json").write_text("{}")  # type: ignore[operator]
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(_config(tiny_model("gpt2"), tmp_path / "out", text_file), print_fn=lambda s: None)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_ctrl_c_in_distillation_keeps_the_student_so_far(
    tiny_model: Callable[[str], Path],
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.pretrained import pipeline

    def stopped(*args: object, losses: list[float], **kwargs: object) -> list[float]:
        losses += [1.0, 0.5]
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "distill", stopped)
    result = compress(
        _config(tiny_model("gpt2"), tmp_path / "out", text_file), print_fn=lambda s: None
    )
    assert result.interrupted and result.distill_steps_done == 2
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["interrupted"] is True
    assert json.loads((tmp_path / "out" / "tensorfold.json").read_text())["interrupted"] is True


# ---- errors: one line, exit 2, nothing written ------------------------------------------
def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # what building the fixtures printed
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_budget_is_rejected_before_anything_loads(
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", never)
    err = _cli_error(
        ["compress", str(tiny_model("gpt2")), "--budget", "1.7", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "budget=1.7 must be a float in (0, 1]" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("not-a-model", "is not a model directory: it has no config.json"),
        ("bad-architecture", "cannot load MODEL_DIR="),
        ("no-tokenizer", "has no tokenizer files"),
        ("missing-data", "does not exist"),
        ("empty-data", "holds no text"),
        ("small-data", "too small for the requested split"),
        ("long-seq", "seq_len=4096 is above the model's 64 positions"),
        ("out-exists", "exists and is not a previous tensorfold output"),
        ("bad-task", "task='translation' must be one of"),
        ("bad-dtype", "dtype='float16' must be one of float32, bfloat16"),
        ("bad-factor-dtype", "factor_dtype='int4' is not one of 'int8'"),
        ("no-stack", "checkpoint_blocks=True: the compressed layers do not sit in a stack"),
        ("bad-activation-memory", "activation_memory=-1.0 must be a multiple of the model's"),
    ],
)
def test_bad_input_fails_at_once_with_one_line(
    case: str,
    pattern: str,
    tiny_model: Callable[[str], Path],
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    model_dir, data = tiny_model("gpt2"), text_file
    extra: list[str] = ["--seq-len", "16"]
    out = tmp_path / "out"
    if case == "not-a-model":
        model_dir = tmp_path / "empty"
        model_dir.mkdir()
    elif case == "bad-architecture":
        model_dir = tmp_path / "bad"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    elif case == "no-tokenizer":
        model_dir = tmp_path / "notok"
        shutil.copytree(
            tiny_model("gpt2"),
            model_dir,
            ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"),
        )
    elif case == "missing-data":
        data = tmp_path / "nothing.txt"
    elif case == "empty-data":
        data = tmp_path / "empty.txt"
        data.write_text("\n\n")
    elif case == "small-data":
        data = tmp_path / "small.txt"
        data.write_text("One short line of text only.\n")
    elif case == "long-seq":
        extra = ["--seq-len", "4096"]
    elif case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad-task":
        extra += ["--task", "translation"]
    elif case == "bad-dtype":
        extra += ["--dtype", "float16"]
    elif case == "bad-factor-dtype":
        extra += ["--factor-dtype", "int4"]
    elif case == "no-stack":
        extra += ["--checkpoint-blocks", "--targets", "lm_head"]
    elif case == "bad-activation-memory":
        extra += ["--activation-memory", "-1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _cli_error(
        [
            "compress",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        capsys,
    )
    assert pattern in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "out-exists":
        assert (out / "keep.txt").read_text() == "mine"


def test_checkpointed_blocks_distil_the_same_student(
    tiny_model: Callable[[str], Path], text_file: Path
) -> None:
    runs = [
        compress(
            # Unbounded activations: under a bound, recomputed blocks run in fewer chunks.
            _config(
                tiny_model("llama"), None, text_file, checkpoint_blocks=flag, activation_memory=None
            ),
            print_fn=lambda s: None,
        )
        for flag in (False, True)
    ]
    assert runs[0].distill_steps_done == runs[1].distill_steps_done > 0
    for (name, a), b in zip(
        runs[0].student.state_dict().items(), runs[1].student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_activation_memory_takes_auto_or_a_number(
    tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["compress", str(tiny_model("gpt2")), "--activation-memory", "lots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "argument --activation-memory: 'lots' is not a number or 'auto'" in err


@pytest.mark.parametrize(
    "flag, expected", [([], "auto"), (["auto"], "auto"), (["2"], 2.0), (["0"], None)]
)
def test_activation_memory_reaches_the_config_from_the_cli(
    flag: list[str],
    expected: float | str | None,
    tiny_model: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tensorfold.pretrained as pretrained

    seen: list[object] = []
    monkeypatch.setattr(pretrained, "compress", lambda config: seen.append(config))
    args = ["--activation-memory", *flag] if flag else []
    assert cli.main(["compress", str(tiny_model("gpt2")), *args]) == 0
    (config,) = seen
    assert config.activation_memory == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize("multiple", [1.0, 0.25, None, "auto"])
def test_activation_memory_bounds_distillation_by_the_models_bytes(
    multiple: float | str | None,
    tiny_model: Callable[[str], Path],
    text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.pretrained import pipeline

    given: list[object] = []
    real = pipeline.distill

    def spy(*args: object, **kwargs: object) -> list[float]:
        given.append(args[3])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "distill", spy)
    config = _config(tiny_model("llama"), None, text_file, activation_memory=multiple)
    r = compress(config, print_fn=lambda s: None)
    model_bytes = sum(p.numel() * p.element_size() for p in r.teacher.parameters())
    (options,) = given
    if multiple == "auto":
        # What the student trains (factors and norms: Llama has no biases), with their
        # gradients and AdamW's two moments, plus the activations: 2.25x the model.
        from tensorfold.nn import FactorizedLinear

        factorized = [m for m in r.student.modules() if isinstance(m, FactorizedLinear)]
        trained = sum(p.numel() * 4 for m in factorized for p in m.parameters())
        trained += sum(p.numel() * 4 for n, p in r.student.named_parameters() if "norm" in n)
        assert 0 < 4 * trained < 2.0 * model_bytes  # the floor of 0.25 is not reached
        multiple = max(0.25, 2.25 - 4 * trained / model_bytes)
    expected = None if multiple is None else int(float(multiple) * model_bytes)
    assert options.activation_bytes == expected  # type: ignore[attr-defined]
    assert r.distill_steps_done > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(
    tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(["compress", str(tiny_model("gpt2")), "--device", "cuda"], capsys)
    assert "device='cuda' but this machine has no CUDA device" in err


def test_vision_needs_data(
    tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(["compress", str(tiny_model("vit")), "--no-progress"], capsys)
    assert "--data is required for a vision model" in err


def test_evaluate_prints_the_metrics(
    tiny_model: Callable[[str], Path],
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    compress(_config(tiny_model("gpt2"), tmp_path / "out", text_file), print_fn=lambda s: None)
    capsys.readouterr()
    assert (
        cli.main(
            [
                "evaluate",
                str(tmp_path / "out"),
                "--original",
                str(tiny_model("gpt2")),
                "--data",
                str(text_file),
                "--seq-len",
                "16",
                "--samples",
                "4",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out
    err = _cli_error(["evaluate", str(tmp_path), "--original", str(tiny_model("gpt2"))], capsys)
    assert "is not a tensorfold output directory" in err


def test_python_dash_m_tensorfold() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tensorfold", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "compress" in done.stdout and "evaluate" in done.stdout


def test_bfloat16_run_writes_a_bfloat16_model(
    tiny_model: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    result = compress(
        _config(tiny_model("llama"), tmp_path / "out", text_file, dtype="bfloat16"),
        print_fn=lambda s: None,
    )
    assert result.reload_verified
    loaded = from_pretrained(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert result.before_distill["held-out"].perplexity_ratio < 1.5


def test_int8_factors_are_written_reported_and_loaded_back(
    tiny_model: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    result = compress(
        _config(tiny_model("gpt2"), tmp_path / "out", text_file, factor_dtype="int8"),
        print_fn=lambda s: None,
    )
    assert result.reload_verified and result.before_quantize is not None
    loaded = from_pretrained(tmp_path / "out")
    layers = [m for m in loaded.modules() if isinstance(m, tensorfold.FactorizedLinear)]
    assert layers and all(m.weight.factors[0].dtype == torch.int8 for m in layers)
    dense, stored = result.linear_bytes
    assert dense == sum(4 * (m.in_features * m.out_features + m.out_features) for m in layers)
    assert stored == tensorfold.memory_report(loaded).parameter_bytes
    assert stored < 0.5 * dense
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["linear_bytes_compressed"] == stored
    assert summary["before_quantize"]["held-out"]["perplexity_ratio"] > 0
    # int8 moves the model a little from the distilled float one, not far.
    ppl = {k: summary[k]["held-out"]["perplexity"] for k in ("before_quantize", "after")}
    assert abs(ppl["after"] / ppl["before_quantize"] - 1) < 0.05
    assert "int8 factors, held-out:" in (tmp_path / "out" / "report.txt").read_text()


def test_fit_time_batches_are_spread_over_the_lengths_and_sized_by_elements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.pretrained import pipeline

    class Task:
        def forward(self, model: object, batch: dict[str, torch.Tensor]) -> None:
            pass

    ticks = iter(range(1000))
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: float(next(ticks)))
    # Ten batches sorted by length: 4 x 10, 4 x 20, ..., 4 x 100 token ids.
    batches = [{"input_ids": torch.zeros(4, 10 * (k + 1))} for k in range(10)]
    # The probe (the median batch, 240 ids) takes 1 s; with one block a batch of n ids is
    # estimated at 2.5 * n / 240 s, all ten at 22.9 s.
    every = pipeline._fit_time_batches(Task(), nn.Identity(), batches, 23.0, 1)  # type: ignore[arg-type]
    assert every == batches
    half = pipeline._fit_time_batches(Task(), nn.Identity(), batches, 11.5, 1)  # type: ignore[arg-type]
    assert [b["input_ids"].shape[1] for b in half] == [10, 30, 50, 70, 90]
    one = pipeline._fit_time_batches(Task(), nn.Identity(), batches, 0.01, 1)  # type: ignore[arg-type]
    assert len(one) == 1


@pytest.mark.parametrize("factor_dtype, later", [(None, 1), ("int8", 2)])
def test_time_limit_leaves_room_for_the_evaluations_after_distillation(
    factor_dtype: str | None,
    later: int,
    tiny_model: Callable[[str], Path],
    text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from tensorfold.pretrained import pipeline, tasks

    slow = 0.3  # seconds each evaluation takes at least

    def compare(self: object, student: nn.Module, batches: list, reference: list) -> object:
        time.sleep(slow)
        return original(self, student, batches, reference)

    original = tasks.CausalLMTask.compare
    monkeypatch.setattr(tasks.CausalLMTask, "compare", compare)
    seen: list[float] = []

    def distill(*args: object) -> tuple[int, bool]:
        seen.append(args[-1])  # type: ignore[arg-type]
        return 0, False

    monkeypatch.setattr(pipeline, "_distill", distill)
    config = _config(tiny_model("gpt2"), None, text_file, time_limit=600, factor_dtype=factor_dtype)
    start = time.perf_counter()
    compress(config, print_fn=lambda s: None)
    # One evaluation set (the user's data): each later evaluation is reserved once.
    assert len(seen) == 1 and seen[0] <= start + 600 - later * slow
    assert seen[0] >= start + 600 - later * slow - 60


def test_language_model_meter_matches_a_direct_computation() -> None:
    import math

    from tensorfold.pretrained.metrics import LanguageModelMeter

    gen = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 2, 6, 11, generator=gen).unbind(0)
    ids = torch.randint(0, 11, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    meter = LanguageModelMeter()
    meter.add(logits, LanguageModelMeter.reference(ref, ids, mask), ids, mask)
    fit = meter.result()
    nll = nll_ref = agree = n = 0.0
    for b in range(2):
        for t in range(5):
            if not mask[b, t + 1]:
                continue
            y = int(ids[b, t + 1])
            nll -= float(torch.log_softmax(logits[b, t].double(), -1)[y])
            nll_ref -= float(torch.log_softmax(ref[b, t].double(), -1)[y])
            agree += int(logits[b, t].argmax() == ref[b, t].argmax())
            n += 1
    assert fit.tokens == n == 8
    assert math.isclose(fit.perplexity, math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(fit.perplexity_original, math.exp(nll_ref / n), rel_tol=1e-5)
    assert fit.top1_agreement == agree / n


def test_the_teacher_runs_once_per_evaluation_set_for_all_stages(
    tiny_model: Callable[[str], Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorfold.pretrained import tasks

    runs: list[int] = []
    original = tasks.CausalLMTask.reference

    def reference(self: object, teacher: nn.Module, batches: list) -> list:
        runs.append(len(batches))
        return original(self, teacher, batches)  # type: ignore[arg-type]

    monkeypatch.setattr(tasks.CausalLMTask, "reference", reference)
    config = _config(tiny_model("gpt2"), None, text_file, distill_steps=2, factor_dtype="int8")
    result = compress(config, print_fn=lambda s: None)
    assert result.distill_steps_done == 2
    assert len(runs) == 1  # one evaluation set (the user's data), three stages


def test_memory_is_released_between_stages(
    tiny_model: Callable[[str], Path],
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.convert import _memory, core, planner
    from tensorfold.pretrained import pipeline, tasks

    events: list[str] = []

    def spy(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def run(*args: object, **kwargs: object) -> object:
            events.append(name)
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(planner, "plan", spy("plan", planner.plan))
    monkeypatch.setattr(core, "tensorize", spy("fit", core.tensorize))
    monkeypatch.setattr(tasks.EncoderTask, "compare", spy("evaluate", tasks.EncoderTask.compare))
    monkeypatch.setattr(pipeline, "distill", spy("distill", pipeline.distill))
    monkeypatch.setattr(pipeline, "release_free_memory", lambda: events.append("release"))
    monkeypatch.setattr(_memory, "return_free_pages", lambda: events.append("pages"))
    r = compress(_config(tiny_model("bert"), tmp_path / "out", text_file), print_fn=lambda s: None)
    assert r.distill_steps_done == 3 and r.counts["evaluation"] <= 32  # one held-out batch
    assert events == [
        *["plan", "release", "fit", "release"],
        *["pages", "evaluate", "pages"],  # before the teacher's and the student's forwards
        *["release", "distill"],
        *["release", "evaluate", "pages", "release"],  # the last before writing the output
    ]


def test_releasing_memory_changes_no_result(
    tiny_model: Callable[[str], Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorfold.convert import _memory
    from tensorfold.pretrained import pipeline

    losses: list[list[float]] = []
    real = pipeline.distill

    def spy(*args: object, **kwargs: object) -> list[float]:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        losses.append(list(out))
        return out

    monkeypatch.setattr(pipeline, "distill", spy)
    config = _config(tiny_model("bert"), None, text_file)
    runs = [compress(config, print_fn=lambda s: None)]
    for module, name in [(pipeline, "release_free_memory"), (_memory, "return_free_pages")]:
        monkeypatch.setattr(module, name, lambda: False)
    runs.append(compress(config, print_fn=lambda s: None))
    a, b = runs
    assert [lp.rank for lp in a.plan.layers] == [lp.rank for lp in b.plan.layers]
    assert [lp.error for lp in a.report.layers] == [lp.error for lp in b.report.layers]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert a.before_distill == b.before_distill and a.after == b.after
    for (name, x), y in zip(
        a.student.state_dict().items(), b.student.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_no_dense_weight_of_the_student_outlives_fitting(
    tiny_model: Callable[[str], Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import weakref

    from tensorfold.convert import core
    from tensorfold.pretrained import pipeline

    dense: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    real_tensorize, real_distill = core.tensorize, pipeline.distill

    def tensorize(student: nn.Module, *args: object, **kwargs: object) -> object:
        names = {lp.name for lp in kwargs["from_plan"].layers}  # type: ignore[attr-defined]
        dense.extend(weakref.ref(student.get_submodule(n).weight) for n in names)
        return real_tensorize(student, *args, **kwargs)  # type: ignore[arg-type]

    def distill(*args: object, **kwargs: object) -> object:
        gc.collect()
        alive.append(sum(r() is not None for r in dense))
        return real_distill(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "tensorize", tensorize)
    monkeypatch.setattr(pipeline, "distill", distill)
    compress(_config(tiny_model("bert"), None, text_file), print_fn=lambda s: None)
    assert len(dense) > 0 and alive == [0]


def test_fused_expert_weights_are_counted_and_named() -> None:
    """Mixture-of-experts models keep their experts in 3-D weights: compress says they stay
    dense instead of leaving them out of its account silently."""
    import transformers

    from tensorfold.pretrained.pipeline import fused_expert_weights

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        vocab_size=64,
    )
    model = transformers.MixtralForCausalLM(config)
    count, names = fused_expert_weights(model)
    expected = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 3}
    assert expected and count == sum(expected.values())
    experts = "model.layers.*.mlp.experts"
    assert names == [f"{experts}.gate_up_proj", f"{experts}.down_proj"]
    dense = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4))
    assert fused_expert_weights(dense) == (0, [])
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    assert any(p.dim() == 3 for p in vit.parameters())  # position embeddings, class token
    assert fused_expert_weights(vit) == (0, [])


def test_default_targets_of_a_shared_layer_encoder_are_its_blocks() -> None:
    """ALBERT runs one shared layer (a list of one): its projections are the targets, not
    the pooler or the embedding projection."""
    import transformers

    from tensorfold.pretrained.pipeline import default_targets

    config = transformers.AlbertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        embedding_size=16,
        vocab_size=64,
    )
    model = transformers.AlbertModel(config)
    targets = default_targets(model)
    names = [lp.name for lp in tensorfold.plan(model, budget=0.5, targets=targets).layers]
    assert len(names) == 6 and all(".albert_layers.0." in n for n in names)
    assert default_targets(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))) is None


def test_text_encoders_distil_on_batches_of_sixteen_and_evaluate_on_thirty_two(
    tiny_model: Callable[[str], Path],
    text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.pretrained import pipeline, tasks

    sizes: dict[str, set[int]] = {"distill": set(), "compare": set()}
    real_distill = pipeline.distill
    real_compare = tasks._TextEncoder.compare

    def distill(student: nn.Module, teacher: nn.Module, batches: list, *a: object, **k: object):
        sizes["distill"].update(len(b["input_ids"]) for b in batches)
        return real_distill(student, teacher, batches, *a, **k)  # type: ignore[arg-type]

    def compare(self: object, student: nn.Module, batches: list, reference: list) -> object:
        sizes["compare"].update(len(b["input_ids"]) for b in batches)
        return real_compare(self, student, batches, reference)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "distill", distill)
    monkeypatch.setattr(tasks._TextEncoder, "compare", compare)
    config = _config(tiny_model("bert"), None, text_file, evaluation_samples=40, distill_steps=2)
    compress(config, print_fn=lambda s: None)
    assert max(sizes["distill"]) == 16 and max(sizes["compare"]) == 32
