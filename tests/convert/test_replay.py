"""Replaying finished blocks during sequential calibration: same fit, fewer block evaluations."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorfold.convert import core as core_mod
from tensorfold.convert import plan, tensorize
from tensorfold.convert import planner as planner_mod
from tensorfold.convert.replay import BlockReplay, block_index, find_stack

from .test_convert import calib, tiny
from .test_spill_cache import _private_tempdir


def distinct_blocks(n: int) -> nn.Module:
    """The tiny model with ``n`` blocks, each with weights of its own."""
    m = tiny()
    m.blocks = nn.ModuleList([copy.deepcopy(m.blocks[0]) for _ in range(n)])
    for blk in m.blocks:
        for p in blk.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return m


def spy_on_replays(monkeypatch: pytest.MonkeyPatch, module: object) -> list[BlockReplay]:
    """Every ``BlockReplay`` that ``module`` makes from now on, in order."""
    made: list[BlockReplay] = []

    class Spy(BlockReplay):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(module, "BlockReplay", Spy)
    return made


def count_block_calls(model: nn.Module) -> list[int]:
    """Evaluations of each block's body (hooks on the block itself still fire when replayed)."""
    calls = [0] * len(model.blocks)
    for i, blk in enumerate(model.blocks):
        blk.up.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_find_stack_and_block_index() -> None:
    m = tiny()
    names = ["inp", "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    prefix, blocks = find_stack(m, names)
    assert prefix == "blocks" and blocks is m.blocks
    assert [block_index(prefix, n) for n in names] == [None, 0, 0, 1, 1]
    assert find_stack(m, ["inp", "blocks.0.up"]) is None  # one block used: nothing to replay


@pytest.mark.parametrize("n_blocks", [2, 4])
def test_replay_gives_bit_identical_fits(monkeypatch: pytest.MonkeyPatch, n_blocks: int) -> None:
    teacher = distinct_blocks(n_blocks)
    with_replay, without = copy.deepcopy(teacher), copy.deepcopy(teacher)
    made = spy_on_replays(monkeypatch, core_mod)
    tensorize(with_replay, budget=0.4, calibration=calib(3), progress=False)
    assert made and all(r.enabled and r.upto == n_blocks - 1 for r in made)  # replay was used
    monkeypatch.setattr(core_mod, "find_stack", lambda *a: None)
    tensorize(without, budget=0.4, calibration=calib(3), progress=False)
    a, b = with_replay.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("memory_bytes", [None, 0])  # 0: every output goes to disk
def test_replay_skips_finished_blocks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, memory_bytes: int | None
) -> None:
    made = _private_tempdir(monkeypatch, tmp_path)
    m = tiny()
    m.blocks = nn.ModuleList([copy.deepcopy(m.blocks[0]) for _ in range(4)])
    batches = calib(3)
    calls = count_block_calls(m)
    rep = BlockReplay(m, m.blocks, batches, lambda mod, b: mod(b), memory_bytes)
    rep.advance(3)  # blocks 0-2 final: cache block 2's output
    assert rep.enabled and rep.upto == 3
    on_disk = [p for d in made if d.exists() for p in d.iterdir()]
    assert len(on_disk) == (3 if memory_bytes == 0 else 0)
    calls[:] = [0] * 4
    with torch.no_grad(), rep.active():
        replayed = [rep.forward(m, b) for b in batches]
    assert calls == [0, 0, 0, 3]  # only the last block runs
    with torch.no_grad():
        assert all(torch.equal(r, m(b)) for r, b in zip(replayed, batches, strict=False))
    rep.close()
    assert not any(d.exists() for d in made)


def test_replay_switches_itself_off_without_room(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made = _private_tempdir(monkeypatch, tmp_path)

    class Usage:
        free = 100  # bytes: half of it is less than one batch's output

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    m = tiny()
    batches = calib(2)
    rep = BlockReplay(m, m.blocks, batches, lambda mod, b: mod(b), memory_bytes=0)
    rep.advance(1)
    assert not rep.enabled and rep.upto == 0
    assert not any(d.exists() for d in made)
    with torch.no_grad(), rep.active():
        assert torch.equal(rep.forward(m, batches[0]), m(batches[0]))  # plain forwards again


class CalledTwice(nn.Module):
    """Block 0 runs twice per forward: its output cannot be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](self.blocks[0](x)))


def test_replay_switches_itself_off_when_outputs_differ() -> None:
    torch.manual_seed(0)
    m = CalledTwice()
    batches = calib(2)
    rep = BlockReplay(m, m.blocks, batches, lambda mod, b: mod(b))
    rep.advance(1)
    assert not rep.enabled and rep.upto == 0
    with torch.no_grad(), rep.active():
        assert torch.equal(rep.forward(m, batches[0]), m(batches[0]))  # plain forwards again


class LaterBlockTwice(nn.Module):
    """Block 1 runs twice per forward: replaying block 0 alone would still be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks
        return b[2](b[1](b[1](b[0](x))))


def test_replay_is_checked_once_and_catches_blocks_called_twice_at_any_depth() -> None:
    torch.manual_seed(0)
    batches = calib(3)
    m = LaterBlockTwice()
    rep = BlockReplay(m, m.blocks, batches, lambda mod, b: mod(b))
    rep.advance(1)
    assert not rep.enabled and rep.upto == 0  # the call order gave it away at depth 1

    m = tiny()
    m.blocks = nn.ModuleList([copy.deepcopy(m.blocks[0]) for _ in range(4)])
    runs: list[int] = []

    def forward(mod: nn.Module, b: torch.Tensor) -> torch.Tensor:
        runs.append(1)
        return mod(b)

    rep = BlockReplay(m, m.blocks, batches, forward)
    for upto in (1, 2, 3):
        rep.advance(upto)
    assert rep.enabled and rep.upto == 3
    # 3 recording passes of 3 batches, plus one check (a full and a replayed forward).
    assert len(runs) == 3 * 3 + 2
    with torch.no_grad(), rep.active():
        assert all(torch.equal(rep.forward(m, b), m(b)) for b in batches)


class UpdatesInPlace(nn.Module):
    """Code after block 0 updates its output in place."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        y = self.blocks[1](h)
        return y + h.mul_(2)


def test_replayed_outputs_are_copies_so_in_place_updates_do_not_change_them() -> None:
    torch.manual_seed(0)
    m = UpdatesInPlace()
    batches = calib(2)
    rep = BlockReplay(m, m.blocks, batches, lambda mod, b: mod(b))
    with torch.no_grad():
        rep.advance(1)
        assert rep.enabled and rep.upto == 1
        with rep.active():
            first = [rep.forward(m, b) for b in batches]
            second = [rep.forward(m, b) for b in batches]
        expected = [m(b) for b in batches]
    for a, b, e in zip(first, second, expected, strict=True):
        assert torch.equal(a, e) and torch.equal(b, e)


def test_sensitivity_replays_the_blocks_before_each_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    m = distinct_blocks(4)
    made = spy_on_replays(monkeypatch, planner_mod)
    calls = count_block_calls(m)
    replayed = plan(m, budget=0.4, calibration=calib(3), factorization="tt")
    assert made and made[0].upto == 3  # the last block's layers ran after three replayed ones
    with_replay = calls[:]
    monkeypatch.setattr(planner_mod, "find_stack", lambda *a: None)
    calls[:] = [0] * 4
    plain = plan(m, budget=0.4, calibration=calib(3), factorization="tt")
    assert with_replay[0] < calls[0]  # block 0 ran less often
    assert [lp.sensitivity for lp in replayed.layers] == [lp.sensitivity for lp in plain.layers]
    assert [lp.rank for lp in replayed.layers] == [lp.rank for lp in plain.layers]
