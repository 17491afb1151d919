"""Data-parallel training of factorized layers: DDP and FSDP2 (gloo, CPU, 2 processes).

One module-scoped run spawns two processes once; each trains every case under DDP and
under FSDP2 (``fully_shard``) on its half of the same global batches and saves its final
parameters. The tests then check, per case, that both ranks hold identical parameters and
that they equal a single-process run on the full global batches (fp32 tolerance).
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tensorfold import FactorizedLinear

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
IN_MODES, OUT_MODES = (2, 4), (3, 4)
# (format, n_layers, implementation): every format once, two with a joint 2-layer tensor.
CASES = [
    ("cp", 1, "factorized"),
    ("tucker", 1, "reconstructed"),
    ("tt", 1, "auto"),
    ("ttm", 1, "factorized"),
    ("tucker", 2, "factorized"),
    ("ttm", 2, "reconstructed"),
]
MODES = ("ddp", "fsdp")
SPAWN_TIMEOUT_S = 240


def case_id(case: tuple) -> str:
    fmt, n_layers, impl = case
    return f"{fmt}-L{n_layers}-{impl}"


class Net(nn.Module):
    """A factorized layer (both of its layers if it holds two) feeding a dense head."""

    def __init__(self, fmt: str, n_layers: int, implementation: str) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.factorized = FactorizedLinear(
            IN_MODES,
            OUT_MODES,
            factorization=fmt,
            rank=0.6,
            n_layers=n_layers,
            implementation=implementation,
        )
        self.head = nn.Linear(self.factorized.out_features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.factorized(x, 0))
        if self.n_layers > 1:
            h = h * self.factorized(x, 1)
        return self.head(h)


def build(case: tuple, seed: int) -> Net:
    torch.manual_seed(seed)
    return Net(*case)


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n_in = IN_MODES[0] * IN_MODES[1]
    return [
        (torch.randn(GLOBAL_BATCH, n_in, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor (FSDP2 shard): gather it (collective)
    return (full() if full is not None else t).detach().clone()


def _run_case(mode: str, case: tuple, seed: int, rank: int) -> dict[str, torch.Tensor]:
    model = build(case, seed)
    shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    local = [(x[shard], y[shard]) for x, y in batches(seed)]
    if mode == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
        train(wrapped, local)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit CPU mesh: without one, FSDP2 moves the shards to CUDA wherever a GPU is
        # visible, and the CPU batches then meet cuda parameters (seen on an H100 machine).
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.factorized, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, local)
    return {k: _full(v) for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, object] = {}
    try:
        for mode in MODES:
            for k, case in enumerate(CASES):
                key = f"{mode}/{case_id(case)}"
                try:
                    results[key] = _run_case(mode, case, seed=100 + k, rank=rank)
                except Exception:  # reported by the test of this case, not fatal to the others
                    results[key] = traceback.format_exc()
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_data_parallel_matches_single_process(rank_results, mode: str, case: tuple) -> None:
    key = f"{mode}/{case_id(case)}"
    per_rank = [r[key] for r in rank_results]
    for rank, got in enumerate(per_rank):
        assert isinstance(got, dict), f"rank {rank} failed {key}:\n{got}"
    # Both ranks hold bit-identical parameters.
    for name in per_rank[0]:
        assert torch.equal(per_rank[0][name], per_rank[1][name]), (
            f"{key}: '{name}' differs across ranks"
        )
    # And they equal one process training on the full global batches.
    seed = 100 + CASES.index(case)
    reference = build(case, seed)
    train(reference, batches(seed))
    expected = reference.state_dict()
    assert set(expected) == set(per_rank[0])
    initial = build(case, seed).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(
            per_rank[0][name],
            value,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{key}: '{name}': {m}",
        )
        assert not torch.equal(value, initial[name]), f"{key}: '{name}' was not trained"


@pytest.mark.cuda
def test_fsdp_on_cuda_matches_single_process() -> None:
    """One-GPU FSDP2 (NCCL) smoke check: sharding a factorized layer on CUDA trains like eager."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        for k, case in enumerate(CASES):
            seed = 100 + k
            data = [(x.cuda(), y.cuda()) for x, y in batches(seed)]
            model = build(case, seed).cuda()
            fully_shard(model.factorized)
            fully_shard(model)
            train(model, data)
            reference = build(case, seed).cuda()
            train(reference, data)
            got = {k2: _full(v) for k2, v in model.state_dict().items()}
            for name, value in reference.state_dict().items():
                torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()
