"""save/load: round trip into a fresh model, atomic writes, clear errors that change nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tensorfold import ConversionError, FactorizedLinear
from tensorfold.convert import load, save, tensorize

from .test_convert import Tiny, calib, linear_names, same_state, state, tiny


@pytest.fixture()
def converted() -> Tiny:
    m = tiny()
    tensorize(
        m, budget=0.5, factorization="auto", calibration=calib(2), refine_steps=5, progress=False
    )
    return m


def test_round_trip_into_a_fresh_model_gives_identical_outputs(
    converted: Tiny, tmp_path: Path
) -> None:
    path = save(converted, tmp_path / "m.safetensors")
    fresh = tiny(seed=123)  # same architecture, different weights
    load(path, fresh)
    x = calib(1, seed=5)[0]
    assert torch.equal(fresh(x), converted(x))
    for name, mod in converted.named_modules():
        if isinstance(mod, FactorizedLinear):
            other = fresh.get_submodule(name)
            assert (other.factorization, other.rank, other.in_tensorized_features) == (
                mod.factorization,
                mod.rank,
                mod.in_tensorized_features,
            )
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_save_replaces_atomically_and_cleans_up_on_failure(
    converted: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(converted, tmp_path / "m.safetensors")
    good = path.read_bytes()
    import safetensors.torch

    def broken(*a: object, **k: object) -> None:
        Path(a[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(converted, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_truncated_file_is_a_clear_error_and_leaves_the_model_untouched(
    converted: Tiny, tmp_path: Path
) -> None:
    path = save(converted, tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 20, 3):
        path.write_bytes(data[:cut])
        fresh = tiny(seed=9)
        before = state(fresh)
        with pytest.raises(ConversionError, match="truncated or not a safetensors file"):
            load(path, fresh)
        assert same_state(fresh, before) and linear_names(fresh) == linear_names(tiny())


def test_mismatched_model_is_a_clear_error(converted: Tiny, tmp_path: Path) -> None:
    path = save(converted, tmp_path / "m.safetensors")
    other = Tiny(d=32)
    before = state(other)
    with pytest.raises(
        ConversionError, match=r"records 'inp' as 16 -> 24, but the model's module is 16 -> 32"
    ):
        load(path, other)
    assert same_state(other, before)
    bigger = Tiny(n=3)
    before = state(bigger)
    with pytest.raises(
        ConversionError, match=r"does not match the model: missing keys \['blocks\.2"
    ):
        load(path, bigger)
    assert same_state(bigger, before)


def test_file_without_record_and_missing_file(tmp_path: Path) -> None:
    import safetensors.torch

    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ConversionError, match="has no tensorfold record"):
        load(plain, tiny())
    with pytest.raises(ConversionError, match="does not exist"):
        load(tmp_path / "nope.safetensors", tiny())
    with pytest.raises(ConversionError, match="directory .* does not exist"):
        save(tiny(), tmp_path / "no" / "dir.safetensors")


def test_unconverted_model_round_trips(tmp_path: Path) -> None:
    m = tiny()
    load(save(m, tmp_path / "d.safetensors"), fresh := tiny(seed=4))
    assert same_state(fresh, state(m))


@pytest.mark.parametrize("training", [False, True])
def test_loaded_layers_take_the_mode_of_the_modules_they_replace(
    converted: Tiny, tmp_path: Path, training: bool
) -> None:
    path = save(converted, tmp_path / "m.safetensors")
    fresh = tiny(seed=123).train(training)
    load(path, fresh)
    assert {m.training for m in fresh.modules()} == {training}
