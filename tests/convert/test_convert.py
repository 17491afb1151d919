"""Whole-model conversion on tiny random models: plan, tensorize, budget, revert, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorfold
from tensorfold import ConversionError, FactorizedLinear
from tensorfold.convert import core as core_mod
from tensorfold.convert import plan, revert, tensorize
from tensorfold.convert.distill import trainable_parameters
from tensorfold.formats import names


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class Tiny(nn.Module):
    """A residual MLP stack with an unused head, like a small encoder."""

    def __init__(self, d: int = 24, h: int = 48, n: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(n)])
        self.unused = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def calib(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(
        0, -2, 16
    )  # correlated, low effective rank
    return [torch.randn(32, 16, generator=g) @ mix for _ in range(n)]


def linear_names(m: nn.Module, kind: type = nn.Linear) -> list[str]:
    return [n for n, mod in m.named_modules() if type(mod) is kind]


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(m: nn.Module, s: dict[str, torch.Tensor]) -> bool:
    now = m.state_dict()
    return now.keys() == s.keys() and all(torch.equal(now[k], s[k]) for k in s)


def test_plan_changes_nothing_and_prints_a_table() -> None:
    m = tiny()
    before = state(m)
    p = plan(m, budget=0.5, calibration=calib())
    assert same_state(m, before) and linear_names(m) == linear_names(tiny())
    assert [lp.name for lp in p.layers] == linear_names(m)
    text = str(p)
    for lp in p.layers:
        assert lp.name in text
    assert "params after" in text and "kept" in text


def test_plan_records_statistics_block_by_block_with_the_same_result() -> None:
    from tensorfold.convert.calibrate import record_stats
    from tensorfold.convert.planner import plan as plan_with

    m = Tiny(n=3)
    names = linear_names(m)
    data = calib(3)
    whole = record_stats(m, names, data, dtype=torch.float32)
    streamed = plan(m, budget=0.4, calibration=data)
    given = plan_with(m, budget=0.4, calibration=data, _stats=whole)
    assert [(lp.name, lp.factorization, lp.rank, lp.error) for lp in streamed.layers] == [
        (lp.name, lp.factorization, lp.rank, lp.error) for lp in given.layers
    ]


def test_plan_and_tensorize_run_the_model_without_autograd() -> None:
    # A forward with autograd on keeps all its activations alive (several times the model).
    m = tiny()
    grad_on: list[bool] = []
    m.register_forward_pre_hook(lambda mod, args: grad_on.append(torch.is_grad_enabled()))
    plan(m, budget=0.5, calibration=calib())
    tensorize(m, budget=0.5, calibration=calib(), refine_steps=2, progress=False)
    assert grad_on and not any(grad_on)


@pytest.mark.parametrize("factorization", [*names(), "auto"])
@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_budget_met_within_two_percent(factorization: str, budget: float) -> None:
    m = tiny()
    report = tensorize(
        m,
        budget=budget,
        factorization=factorization,
        calibration=calib(2),
        refine_steps=5,
        progress=False,
    )
    assert abs(report.kept - budget) <= 0.02 * budget
    after = sum(
        mod.weight.num_parameters() for mod in m.modules() if isinstance(mod, FactorizedLinear)
    )
    assert after == report.params_after
    assert not linear_names(m)  # every nn.Linear replaced
    assert m(calib(1)[0]).isfinite().all()


def test_targets_and_exclude_are_globs_on_full_names() -> None:
    m = tiny()
    p = plan(m, budget=0.5, targets="blocks.*")
    assert [lp.name for lp in p.layers] == [
        "blocks.0.up",
        "blocks.0.down",
        "blocks.1.up",
        "blocks.1.down",
    ]
    p = plan(m, budget=0.5, targets=["blocks.*", "inp"], exclude="*.down")
    assert [lp.name for lp in p.layers] == ["inp", "blocks.0.up", "blocks.1.up"]
    tensorize(m, budget=0.5, targets="blocks.1.*", progress=False)
    assert isinstance(m.blocks[1].up, FactorizedLinear) and type(m.blocks[0].up) is nn.Linear


def test_data_aware_fit_beats_data_free_and_sequential_helps() -> None:
    m, x = tiny(), calib(2, seed=7)[0]
    ref = m(x).detach()

    def err(**kw: object) -> float:
        c = copy.deepcopy(m)
        tensorize(c, budget=0.4, factorization="tt", progress=False, **kw)
        return float((c(x).detach() - ref).norm() / ref.norm())

    free = err()
    aware = err(calibration=calib(), sequential=False)
    seq = err(calibration=calib(), sequential=True)
    assert aware < 0.7 * free
    assert seq <= aware * 1.05


def test_auto_picks_the_lowest_error_format_per_layer() -> None:
    m = tiny()
    p = plan(m, budget=0.5, factorization="auto", calibration=calib(2), candidates=names())
    for lp in p.layers:
        assert set(lp.candidates) == set(names())
        assert lp.candidates[lp.factorization] == min(lp.candidates.values())


def test_the_api_default_is_the_clis_auto_with_or_without_calibration() -> None:
    for data in (None, calib(2)):
        p = plan(tiny(), budget=0.5, calibration=data)
        assert {lp.factorization for lp in p.layers} == {"lowrank"}
        assert abs(p.kept - 0.5) <= 0.02 * 0.5


def test_auto_is_lowrank_by_default_and_compares_the_candidates_given() -> None:
    p = plan(tiny(), budget=0.5, factorization="auto", calibration=calib(2))
    assert {lp.factorization for lp in p.layers} == {"lowrank"}
    assert all(not lp.candidates for lp in p.layers)  # one candidate: nothing to compare
    p = plan(
        tiny(),
        budget=0.5,
        factorization="auto",
        calibration=calib(2),
        candidates=("tucker", "lowrank"),
    )
    for lp in p.layers:
        assert set(lp.candidates) == {"tucker", "lowrank"}
        assert lp.candidates[lp.factorization] == min(lp.candidates.values())


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_lowrank_fits_better_than_a_pair_at_the_same_share(budget: float) -> None:
    p = plan(
        tiny(),
        budget=budget,
        factorization="auto",
        calibration=calib(2),
        candidates=("tt", "lowrank"),
    )
    assert abs(p.kept - budget) <= 0.02 * budget
    for lp in p.layers:
        if lp.name == "unused":  # rank 1 in both at its share: a tie
            continue
        assert lp.factorization == "lowrank"
        assert lp.candidates["lowrank"] < lp.candidates["tt"]
    with pytest.raises(ConversionError, match=r"candidates=\[\] must name one or more formats"):
        plan(tiny(), budget=0.5, factorization="auto", candidates=[])


def test_global_allocation_gives_more_to_harder_layers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():  # layer 0 exactly rank 4, layer 1 full rank
        net[0].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32))
    p = plan(net, budget=0.5)
    shares = {lp.name: lp.share for lp in p.layers}
    assert shares["0"] < 0.3 < shares["1"]
    assert abs(p.kept - 0.5) <= 0.01


def test_failure_while_fitting_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny()
    before = state(m)
    calls = {"n": 0}
    real = core_mod.fit_weight

    def flaky(*a: object, **k: object) -> float:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in layer 3")
        return real(*a, **k)

    monkeypatch.setattr(core_mod, "fit_weight", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        tensorize(m, budget=0.5, calibration=calib(2), progress=False)
    assert same_state(m, before) and linear_names(m) == linear_names(tiny())


def test_in_place_fitting_lets_each_dense_layer_go_and_restores_on_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc
    import weakref

    teacher = Tiny(n=3)
    student = copy.deepcopy(teacher)
    before = state(student)
    dense = [weakref.ref(m) for m in student.modules() if isinstance(m, nn.Linear)]
    gone: list[int] = []
    real = core_mod.fit_weight

    def flaky(*a: object, **k: object) -> float:
        gc.collect()
        gone.append(sum(r() is None for r in dense))
        if len(gone) == 6:
            raise RuntimeError("boom in layer 6")
        return real(*a, **k)

    monkeypatch.setattr(core_mod, "fit_weight", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        tensorize(student, budget=0.5, calibration=calib(2), reference=teacher, progress=False)
    assert gone[-1] >= 4  # the dense layers already replaced were freed while fitting
    assert same_state(student, before) and linear_names(student) == linear_names(teacher)
    monkeypatch.setattr(core_mod, "fit_weight", real)
    tensorize(student, budget=0.5, calibration=calib(2), reference=teacher, progress=False)
    assert len(linear_names(student, FactorizedLinear)) == len(linear_names(teacher))


def test_revert_gives_dense_layers_with_the_same_outputs() -> None:
    m = tiny()
    tensorize(m, budget=0.5, calibration=calib(2), progress=False)
    x = calib(1, seed=3)[0]
    y = m(x).detach()
    assert revert(m) == 6
    assert not any(isinstance(mod, FactorizedLinear) for mod in m.modules())
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)


def test_unused_layers_are_converted_without_data() -> None:
    m = tiny()
    report = tensorize(m, budget=0.5, calibration=calib(2), progress=False)
    assert isinstance(m.unused, FactorizedLinear)
    assert "unused" in [lp.name for lp in report.layers]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.0}, r"budget=0\.0 must be a float in \(0, 1\]"),
        ({"budget": 1.5}, r"budget=1\.5 must be a float in \(0, 1\]"),
        ({"budget": "half"}, r"budget='half'"),
        (
            {"factorization": "svd"},
            r"factorization='svd' is not known.*'cp', 'tucker', 'tt', 'ttm'",
        ),
        ({"targets": "nothing.*"}, r"no nn\.Linear module matches targets='nothing\.\*'"),
        ({"calibration": torch.randn(4, 16)}, r"calibration must be an iterable of model inputs"),
        ({"calibration": []}, r"calibration is empty"),
        ({"budget": None}, r"give budget="),
        ({"allocation": "greedy"}, r"allocation='greedy' must be 'global' or 'uniform'"),
        ({"targets": [1]}, r"targets=\[1\] must be a glob string"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_change_nothing(kwargs: dict, match: str) -> None:
    m = tiny()
    before = state(m)
    with pytest.raises(ConversionError, match=match):
        tensorize(m, progress=False, **kwargs)
    assert same_state(m, before) and linear_names(m) == linear_names(tiny())


def test_per_layer_rank_without_budget() -> None:
    m = tiny()
    p = plan(m, budget=None, rank=3, factorization="tt")
    assert all(lp.rank == (3,) for lp in p.layers)


def test_distill_lowers_the_loss() -> None:
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    losses = tensorfold.convert.distill(
        student, teacher, calib(4), steps=40, lr=3e-3, progress=False
    )
    assert len(losses) == 40
    assert sum(losses[-4:]) < sum(losses[:4])
    # No gradients left behind, and the frozen parameters are as they were.
    assert all(p.grad is None and p.requires_grad for p in student.parameters())
    with pytest.raises(ConversionError, match="steps=-1 must be an int >= 0"):
        tensorfold.convert.distill(student, teacher, calib(1), steps=-1)
    with pytest.raises(ConversionError, match=r"max_seconds=0 must be > 0 \(or None: no limit\)"):
        tensorfold.convert.distill(student, teacher, calib(1), steps=2, max_seconds=0)


def test_distill_matches_intermediate_features_and_trains_norms() -> None:
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    norm_before = student.blocks[0].norm.weight.detach().clone()
    x = calib(1, seed=5)[0]
    err0 = float((student(x) - teacher(x)).norm() / teacher(x).norm())
    losses = tensorfold.convert.distill(
        student,
        teacher,
        calib(4),
        steps=60,
        lr=3e-3,
        progress=False,
        features="blocks.*[0-9]",
        parameters="factorized+norms",
    )
    assert len(losses) == 60 and sum(losses[-4:]) < sum(losses[:4])
    assert not torch.equal(student.blocks[0].norm.weight, norm_before)  # norms are trained too
    err1 = float((student(x) - teacher(x)).norm() / teacher(x).norm())
    assert err1 < err0
    with pytest.raises(ConversionError, match="features='nothing' matches no module"):
        tensorfold.convert.distill(student, teacher, calib(1), steps=1, features="nothing")
    with pytest.raises(ConversionError, match="parameters='some'"):
        tensorfold.convert.distill(student, teacher, calib(1), steps=1, parameters="some")


def test_factorized_plus_norms_trains_a_model_librarys_own_norm_classes() -> None:
    class LlamaRMSNorm(nn.Module):  # as transformers writes it: not an nn.RMSNorm
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)

    class Embedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 64))

    model = nn.Sequential(Embedding(), nn.Linear(64, 64), LlamaRMSNorm(64), nn.Linear(64, 4))
    tensorize(model, budget=0.5, targets=["1"], progress=False)
    chosen = {id(p) for p in trainable_parameters(model, "factorized+norms")}
    named = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert "2.weight" in named  # the norm
    assert "3.bias" in named and "3.weight" not in named  # another bias, not its weight
    assert "0.table" not in named
    assert {n for n in named if n.startswith("1.")} == {
        n for n, _ in model.named_parameters() if n.startswith("1.")
    }


def test_distill_with_checkpointed_blocks_is_the_same_run() -> None:
    teacher = Tiny(n=3)
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    runs = []
    for checkpoint in (False, True):
        s = copy.deepcopy(student)
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = tensorfold.convert.distill(
                s,
                teacher,
                calib(3),
                steps=6,
                lr=3e-3,
                progress=False,
                features="blocks.*[0-9]",
                checkpoint_blocks=checkpoint,
            )
        runs.append((losses, s.state_dict(), sum(saved)))
        assert not any("forward" in blk.__dict__ for blk in s.blocks)  # restored
    (plain, plain_state, plain_saved), (ckpt, ckpt_state, ckpt_saved) = runs
    torch.testing.assert_close(torch.tensor(ckpt), torch.tensor(plain))
    for k in plain_state:
        torch.testing.assert_close(ckpt_state[k], plain_state[k])
    assert ckpt_saved < plain_saved / 2  # block activations are not kept for backward
    flat = nn.Sequential(FactorizedLinear((4, 4), (4, 4), rank=0.5), nn.ReLU())
    with pytest.raises(ConversionError, match="checkpoint_blocks=True: the student has no stack"):
        tensorfold.convert.distill(flat, copy.deepcopy(flat), calib(1), checkpoint_blocks=True)
    with pytest.raises(ConversionError, match="checkpoint_blocks='yes' must be True or False"):
        tensorfold.convert.distill(student, teacher, calib(1), checkpoint_blocks="yes")


def test_distill_splits_batches_above_the_activation_limit_with_the_same_gradients() -> None:
    teacher = Tiny(n=3)
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    data = calib(3)
    # Rows enter in equal numbers of elements, so a mean over rows splits exactly.
    per_row_mean = lambda s, t, b: (s - t).square().mean()  # noqa: E731
    # The activations of one forward on a whole batch, counted independently.
    kept: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in student.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(data[0])
    whole = sum(kept.values())
    runs = []
    for limit, checkpoint in ((None, False), (whole // 3, False), (whole // 3, True)):
        s = copy.deepcopy(student)
        rows: list[int] = []

        def forward(m: nn.Module, b: torch.Tensor, rows: list[int] = rows) -> torch.Tensor:
            if m is not teacher:
                rows.append(len(b))
            return m(b)

        losses = tensorfold.convert.distill(
            s,
            teacher,
            data,
            steps=5,
            lr=3e-3,
            progress=False,
            loss_fn=per_row_mean,
            forward=forward,
            activation_bytes=limit,
            checkpoint_blocks=checkpoint,
        )
        runs.append((losses, s.state_dict(), rows))
    (plain, plain_state, plain_rows), (split, split_state, split_rows), recomputed = runs
    # Recomputed blocks keep less, so the same limit needs fewer chunks.
    assert max(recomputed[2][1:]) > max(split_rows[1:])
    assert set(plain_rows) == {32}
    # One measuring forward on an eighth of the largest batch, then chunks of at most a
    # third of each batch.
    assert split_rows[0] == 4 and 1 < max(split_rows[1:]) <= 32 // 3 + 1
    assert sum(split_rows[1:]) == 32 * 5
    torch.testing.assert_close(torch.tensor(split), torch.tensor(plain))
    for k in plain_state:
        torch.testing.assert_close(split_state[k], plain_state[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConversionError, match=r"activation_bytes=0 must be an int >= 1"):
        tensorfold.convert.distill(student, teacher, data, activation_bytes=0)


def test_measuring_the_activations_leaves_no_graph_alive() -> None:
    import gc

    from tensorfold.convert.distill import _saved_bytes

    model = Tiny(n=3)
    batch = calib(1)[0]

    def graphs() -> int:
        gc.collect()
        return sum(
            1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None
        )

    before = graphs()
    # softmax and tanh save their own outputs: the case that makes reference cycles.
    saved = _saved_bytes(model, lambda m, b: m(b).softmax(-1).tanh(), batch)
    # gelu's input and the norms' inputs at least: each (32, d) float32 or wider.
    assert saved >= 3 * 32 * 24 * 4
    assert graphs() == before


def test_distill_cached_teacher_gives_the_same_run_with_one_teacher_pass() -> None:
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    one_batch = 3 * 32 * 24 * 4  # output and two block features of one batch, float32
    runs, calls = [], []
    cases = [(False, None, False), (True, None, False), (True, 0, False), (True, one_batch, False)]
    cases.append((True, 0, True))  # every batch's outputs on disk
    for cache, limit, disk in cases:
        s = copy.deepcopy(student)
        calls.append(0)
        handle = teacher.register_forward_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        try:
            runs.append(
                tensorfold.convert.distill(
                    s,
                    teacher,
                    calib(3),
                    steps=12,
                    lr=1e-3,
                    progress=False,
                    features="blocks.*[0-9]",
                    cache_teacher=cache,
                    cache_bytes=limit,
                    cache_disk=disk,
                )
            )
        finally:
            handle.remove()
    assert all(r == runs[0] for r in runs)  # bit-identical losses
    # cached: the teacher runs once per batch; a limit of 0 caches nothing, one batch's
    # worth keeps only the first batch
    assert calls[:3] == [12, 3, 12] and 3 < calls[3] < 12
    assert calls[4] == 3  # from disk: once per batch, and the same losses


@pytest.mark.parametrize(("n", "steps"), [(5, 3), (5, 5), (5, 12), (4, 8), (1, 3), (3, 0)])
def test_distill_visits_say_whether_each_batch_comes_round_again(n: int, steps: int) -> None:
    from tensorfold.convert.distill import _visits

    visits = list(_visits(n, steps, torch.Generator().manual_seed(0)))
    order = [i for i, _ in visits]
    assert len(order) == steps
    for p in range(0, steps, n):  # each pass, a permutation (the last one cut short)
        assert len(set(order[p : p + n])) == len(order[p : p + n])
    assert [again for _, again in visits] == [i in order[k + 1 :] for k, i in enumerate(order)]


def test_distill_caches_only_batches_that_come_round_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorfold.convert.spill_cache import SpillCache

    kept: list[int] = []
    real_put = SpillCache.put

    def put(self: SpillCache, index: int, value: object) -> bool:
        kept.append(index)
        return real_put(self, index, value)

    monkeypatch.setattr(SpillCache, "put", put)
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    for steps, expected in [(4, 0), (6, 2)]:  # 4 batches: one pass, then two steps more
        kept.clear()
        tensorfold.convert.distill(
            copy.deepcopy(student),
            teacher,
            calib(4),
            steps=steps,
            progress=False,
            cache_teacher=True,
        )
        assert len(kept) == expected


def test_distill_shuffles_the_first_pass_too() -> None:
    # Callers group batches by length: a run stopped within its first pass must not see
    # only the first batches in order.
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    batches = calib(8)
    seen: list[int] = []
    ids = {id(b): i for i, b in enumerate(batches)}
    handle = student.register_forward_pre_hook(lambda m, a: seen.append(ids[id(a[0])]))
    try:
        tensorfold.convert.distill(student, teacher, batches, steps=16, progress=False)
    finally:
        handle.remove()
    assert sorted(seen[:8]) == sorted(seen[8:]) == list(range(8))  # each pass, every batch
    assert seen[:4] != [0, 1, 2, 3] and seen[:8] != seen[8:]


def test_distill_refuses_a_negative_cache_limit() -> None:
    teacher = tiny()
    with pytest.raises(ConversionError, match=r"cache_bytes=-1 must be an int >= 0"):
        tensorfold.convert.distill(copy.deepcopy(teacher), teacher, calib(1), cache_bytes=-1)


def test_distill_time_limit_ends_the_run_early() -> None:
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    losses = tensorfold.convert.distill(
        student, teacher, calib(2), steps=100000, lr=1e-3, progress=False, max_seconds=0.5
    )
    assert 0 < len(losses) < 100000


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    from tensorfold.convert.distill import _lr_factor

    assert _lr_factor(0.0, 0.1) < 0.05 and abs(_lr_factor(0.1, 0.1) - 1) < 1e-9
    assert _lr_factor(0.5, 0.1) > _lr_factor(0.9, 0.1) > 0 and _lr_factor(1.0, 0.1) < 1e-9


def test_training_sentences_are_disjoint_from_evaluation() -> None:
    from tensorfold.pretrained.corpus import (
        calibration_and_evaluation_sentences,
        training_sentences,
    )

    cal, ev = calibration_and_evaluation_sentences(64, 128)
    train = training_sentences(128)
    assert train[:64] == cal and not set(train) & set(ev) and len(train) > 1000


def test_distill_checks_memory_growth_after_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    distill_mod = importlib.import_module("tensorfold.convert.distill")

    made: list[object] = []

    class Recorder:
        def __init__(self, margin: int) -> None:
            self.margin, self.calls = margin, 0
            made.append(self)

        def __call__(self) -> bool:
            self.calls += 1
            return False

    monkeypatch.setattr(distill_mod, "TrimOnGrowth", Recorder)
    teacher = tiny()
    student = copy.deepcopy(teacher)
    tensorize(student, budget=0.3, calibration=calib(2), progress=False)
    losses = tensorfold.convert.distill(student, teacher, calib(3), steps=4, progress=False)
    (rec,) = made
    assert rec.calls == len(losses) == 4  # type: ignore[attr-defined]
    assert rec.margin == 16 << 20  # a tiny student: the floor of the margin


class SameMap(nn.Linear):
    """A model library's subclass with its own forward of the same map (Falcon's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Adapted(nn.Linear):
    """A subclass whose forward adds something: not a plain linear map."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.extra = nn.Parameter(torch.full((d_out,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.extra


def _with_subclass(cls: type[nn.Linear]) -> Tiny:
    m = tiny()
    for b in m.blocks:
        old = b.up
        b.up = cls(old.in_features, old.out_features)
        b.up.load_state_dict(old.state_dict(), strict=False)
    return m


def test_a_subclass_computing_the_linear_map_is_converted_exactly_at_full_rank() -> None:
    m = _with_subclass(SameMap)
    x = calib(1, seed=3)[0]
    with torch.no_grad():
        y = m(x).double()
    tensorize(m, budget=1.0, factorization="lowrank", calibration=calib(2), progress=False)
    assert all(isinstance(b.up, FactorizedLinear) for b in m.blocks)
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), y, rtol=1e-4, atol=1e-5)


def test_subclasses_with_another_forward_and_torchs_own_are_left_alone() -> None:
    m = _with_subclass(Adapted)
    mha = nn.MultiheadAttention(24, 2)  # out_proj: torch's NonDynamicallyQuantizableLinear
    m.add_module("attn", mha)
    tensorize(m, budget=0.5, calibration=calib(2), progress=False)
    assert all(type(b.up) is Adapted for b in m.blocks)
    assert type(mha.out_proj) is not FactorizedLinear
    assert all(isinstance(b.down, FactorizedLinear) for b in m.blocks)


def test_no_candidate_error_names_the_subclasses_left_alone() -> None:
    m = nn.Sequential(Adapted(8, 8), nn.ReLU(), Adapted(8, 4))
    refused = r"left alone, subclasses of nn\.Linear.*0 \(Adapted\)"
    with pytest.raises(ConversionError, match=refused):
        plan(m, budget=0.5, progress=False)
