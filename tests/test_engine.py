"""The training engine on a task small enough to check by hand: a linear regression whose loss draws noise
from the micro-batch's stream, and whose evaluations are scripted. Each test states what the engine owns
(the schedule and accumulation, the best checkpoint and early stopping, resume, the non-finite checks)
against a straightforward computation of the same thing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import write_config
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from minigpt4.config import RunConfig, load_config
from minigpt4.errors import DiffRecError
from minigpt4.training.engine import (
    Engine,
    Loop,
    MicroBatch,
    Task,
    epoch_generator,
    epoch_loop,
    micro_batch_generator,
    shuffled_batches,
    step_loop,
)
from minigpt4.training.run_folder import BEST, LAST, run_accelerator

ROWS, FEATURES, BATCH = 12, 3, 2  # six micro-batches an epoch


class Stop(Exception):
    """A crash at a chosen micro-batch (what a killed process leaves: checkpoints up to there)."""


class Regression(Task):
    """Least squares on fixed rows; the noise added to the targets comes from the micro-batch's stream."""

    name = "regression"

    def __init__(self, scores: list[float] | None = None, crash_at: int | None = None) -> None:
        torch.manual_seed(0)  # the same initial weights in every run of a test
        self.model = nn.Linear(FEATURES, 1)
        data = torch.Generator().manual_seed(1)
        self.x = torch.randn(ROWS, FEATURES, generator=data)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
        self.select = "score" if scores is not None else None
        self.scores, self.crash_at = list(scores or []), crash_at
        self.evaluated: list[torch.Tensor] = []  # the weights at each evaluation
        self.where: list[tuple[int, int, int]] = []  # (step, position, epoch) of each micro-batch's loss

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> list[torch.Tensor]:
        order = torch.randperm(ROWS, generator=epoch_generator(7, epoch))
        return list(order.split(BATCH))

    def loss(self, model: nn.Module, batch: torch.Tensor, where: MicroBatch) -> dict[str, torch.Tensor]:
        if where.position == self.crash_at:
            raise Stop
        self.where.append((where.step, where.position, where.epoch))
        noise = 0.1 * torch.randn(len(batch), generator=where.generator)
        error = model(self.x[batch]).squeeze(-1) - (self.y[batch] + noise)
        return {"loss": error.pow(2).mean(), "abs": error.abs().mean()}

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        self.evaluated.append(model.weight.detach().clone())
        return {"score": self.scores.pop(0)} if self.select else {}

    def save_weights(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {name: value.contiguous() for name, value in self.model.state_dict().items()}, folder / "w.safetensors"
        )

    def load_weights(self, folder: Path) -> None:
        self.model.load_state_dict(load_file(folder / "w.safetensors"))


@pytest.fixture(scope="module")
def config(tiny_dataset, tmp_path_factory):
    return load_config(write_config(tmp_path_factory.mktemp("engine"), tiny_dataset))


def fit(task: Task, loop: Loop, config, run_dir: Path, resume_from: Path | None = None):
    """One Engine.fit of ``task`` on the CPU."""
    engine = Engine(task, loop, run_accelerator(cpu=True), config, run_dir)
    return engine.fit(resume_from)


def test_steps_follow_accumulation_clipping_and_the_warmup_cosine_schedule(config, tmp_path):
    """Eight optimizer steps of two accumulated micro-batches each, clipped, under warmup then cosine, end where
    a plain loop over the same micro-batches and noise ends."""
    loop = Loop(seed=3, max_epochs=9, max_steps=8, lr=0.05, weight_decay=0.1, warmup_steps=2, accumulation=2,
                max_grad_norm=0.5, log_every=4)  # fmt: skip
    task = Regression()
    result = fit(task, loop, config, tmp_path)

    reference = Regression()
    model, accelerator = reference.model, run_accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, 8)
    position, losses, errors = 0, [], []
    for epoch in range(3):  # 24 micro-batches: four epochs of six would be too many
        for batch in reference.epoch_batches(epoch, accelerator):
            where = MicroBatch(position // 2, position, epoch, micro_batch_generator(3, position, accelerator))
            parts = reference.loss(model, batch, where)
            (parts["loss"] / 2).backward()
            losses.append(parts["loss"].item())
            errors.append(parts["abs"].item())
            position += 1
            if position % 2 == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if position == 16:
                break
        if position == 16:
            break
    assert result.steps == 8 and result.epochs == 2 and result.best_step == 0
    assert task.where == reference.where and result.model.weight is task.model.weight
    assert torch.allclose(task.model.weight, model.weight, atol=1e-6)
    assert torch.allclose(task.model.bias, model.bias, atol=1e-6)
    assert [point["step"] for point in result.curve] == [4, 8] and [p["epoch"] for p in result.curve] == [1, 2]
    assert result.curve[0]["loss"] == pytest.approx(sum(losses[:8]) / 8, rel=1e-5)
    assert result.curve[1]["loss"] == pytest.approx(sum(losses[8:16]) / 8, rel=1e-5)
    assert result.curve[1]["abs"] == pytest.approx(sum(errors[8:16]) / 8, rel=1e-5)


def test_accumulated_gradients_are_the_mean_of_the_micro_batches(config, tmp_path):
    """Plain SGD, which unlike Adam is not blind to the gradient's scale: three accumulated micro-batches take
    the step of their mean loss. An epoch of six micro-batches holds one step of four (a step spans epochs)."""

    class Plain(Regression):
        def optimizer(self, params, loop):
            return torch.optim.SGD(params, lr=loop.lr)

        def scheduler(self, optimizer, loop, total_steps):
            return None

    task = Plain()
    fit(task, Loop(seed=1, max_epochs=1, lr=0.1, accumulation=3), config, tmp_path / "sgd")
    reference = Plain()
    model, accelerator = reference.model, run_accelerator(cpu=True)
    for step, batches in enumerate(torch.stack(reference.epoch_batches(0, accelerator)).split(3)):
        model.zero_grad()
        for offset, batch in enumerate(batches):
            position = 3 * step + offset
            where = MicroBatch(step, position, 0, micro_batch_generator(1, position, accelerator))
            (reference.loss(model, batch, where)["loss"] / 3).backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.1 * param.grad
    assert torch.allclose(task.model.weight, model.weight, atol=1e-6)

    spanning = Regression()
    result = fit(spanning, Loop(seed=1, max_epochs=2, accumulation=4), config, tmp_path / "span")
    assert result.steps == 2 and [where[:2] for where in spanning.where] == [(i // 4, i) for i in range(8)]


def test_the_best_evaluation_is_kept_and_patience_stops_the_run(config, tmp_path):
    """Scores 0.1, nan, 0.5, 0.5, 0.3, 0.4: the best is step 3's (a nan never wins, a tie is no improvement);
    after three evaluations without improvement the run stops at step 6, with step 3's weights in best."""
    task = Regression(scores=[0.1, math.nan, 0.5, 0.5, 0.3, 0.4, 0.9])
    loop = Loop(seed=0, max_epochs=5, lr=0.05, evaluate_every=1, patience=3)
    result = fit(task, loop, config, tmp_path)
    assert result.best_step == 3 and result.steps == 6 and len(task.scores) == 1
    assert [point["step"] for point in result.curve] == [1, 2, 3, 4, 5, 6]
    assert torch.equal(load_file(tmp_path / "checkpoints" / BEST / "w.safetensors")["weight"], task.evaluated[2])
    assert not torch.equal(task.evaluated[2], task.evaluated[5])
    state = json.loads((tmp_path / "checkpoints" / LAST / "trainer_state.json").read_text())
    assert (state["step"], state["best_step"], state["stale"], state["best"]) == (6, 3, 3, {"score": 0.5})
    # a first evaluation that selects nothing already counts against patience
    late = fit(Regression(scores=[math.nan, 0.2, 0.1, 0.1]), Loop(seed=0, max_epochs=5, evaluate_every=1, patience=2),
               config, tmp_path / "late")  # fmt: skip
    assert (late.best_step, late.steps) == (2, 4)


def test_without_patience_the_run_goes_on_and_without_select_keeps_no_best(config, tmp_path):
    """No patience: every evaluation runs; a task that does not select writes no best checkpoint."""
    task = Regression(scores=[0.5, 0.1, 0.1, 0.1])
    result = fit(task, Loop(seed=0, max_epochs=9, max_steps=4, evaluate_every=1), config, tmp_path / "a")
    assert result.steps == 4 and result.best_step == 1 and not task.scores
    plain = fit(Regression(), Loop(seed=0, max_epochs=1, evaluate_every=2), config, tmp_path / "b")
    assert plain.steps == 6 and [point["step"] for point in plain.curve] == [2, 4, 6]
    assert not (tmp_path / "b" / "checkpoints" / BEST).exists() and (tmp_path / "b" / "checkpoints" / LAST).is_dir()


@pytest.mark.parametrize("crash_at", [5, 9])
def test_a_crashed_run_resumed_from_last_ends_as_the_uninterrupted_one(config, tmp_path, crash_at):
    """Checkpoints every two steps; a crash mid-epoch (micro-batch 5) or in the second epoch (9) loses what
    followed the last checkpoint, and the resumed run ends with the same weights, curve and best."""
    loop = Loop(seed=5, max_epochs=3, lr=0.05, evaluate_every=2, checkpoint_every=2, log_every=1)
    scores = [0.2, 0.6, 0.4, 0.7, 0.1, 0.3, 0.5, 0.2, 0.8]
    whole = Regression(scores=scores)
    expected = fit(whole, loop, config, tmp_path / "whole")

    crashed = Regression(scores=scores, crash_at=crash_at)
    with pytest.raises(Stop):
        fit(crashed, loop, config, tmp_path / "crashed")
    resumed_task = Regression(scores=scores[crash_at // 2 :])  # the evaluations after the last checkpoint
    resumed = fit(resumed_task, loop, config, tmp_path / "resumed", tmp_path / "crashed" / "checkpoints" / LAST)
    assert resumed.steps == expected.steps == 18 and resumed.best_step == expected.best_step
    assert torch.equal(resumed_task.model.weight, whole.model.weight)
    assert [point["step"] for point in resumed.curve] == list(range(1, 19))
    for got, want in zip(resumed.curve, expected.curve):
        assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    best = load_file(tmp_path / "resumed" / "checkpoints" / BEST / "w.safetensors")["weight"]
    assert torch.equal(best, load_file(tmp_path / "whole" / "checkpoints" / BEST / "w.safetensors")["weight"])


def test_a_non_finite_loss_or_gradient_norm_stops_with_the_checkpoint_it_keeps(config, tmp_path):
    """A nan loss names its step and the logged parts; an infinite gradient norm names the last checkpoint."""

    class Exploding(Regression):
        def loss(self, model, batch, where):
            parts = super().loss(model, batch, where)
            if where.position == 3:
                parts["loss"] = parts["loss"] * math.nan
            return parts | {"extra": torch.tensor(2.0)}

    with pytest.raises(DiffRecError, match=r"loss became nan at epoch 1, step 3, abs [0-9.e+-]+, extra 2; training stopped, "
                       r"the last checkpoint is kept at .*checkpoints/last$"):  # fmt: skip
        fit(Exploding(), Loop(seed=0, max_epochs=1, checkpoint_every=2), config, tmp_path / "loss")

    class Steep(Regression):
        def loss(self, model, batch, where):
            parts = super().loss(model, batch, where)
            return parts | {"loss": parts["loss"] * (math.inf if where.position == 1 else 1.0)}

    with pytest.raises(DiffRecError, match=r"loss became inf at epoch 1, step 1"):
        fit(Steep(), Loop(seed=0, max_epochs=1), config, tmp_path / "inf")

    class Unbounded(Regression):
        def loss(self, model, batch, where):
            parts = super().loss(model, batch, where)
            if where.position == 2:  # the loss stays finite; d sqrt(x) / dx at 0 does not
                parts["loss"] = parts["loss"] + torch.sqrt(model.bias.sum() - model.bias.sum().detach())
            return parts

    with pytest.raises(DiffRecError, match=r"gradient norm became (inf|nan) at epoch 1, step 2; training stopped, "
                       r"the best checkpoint so far is kept at \(none yet\)"):  # fmt: skip
        fit(Unbounded(scores=[0.1] * 9), Loop(seed=0, max_epochs=1, max_grad_norm=1.0, evaluate_every=4),
            config, tmp_path / "norm")  # fmt: skip
    with pytest.raises(DiffRecError, match=r"step 2; training stopped, the best checkpoint so far is kept at "
                       r".*norm-best/checkpoints/best$"):  # fmt: skip
        fit(Unbounded(scores=[0.1] * 9), Loop(seed=0, max_epochs=1, max_grad_norm=1.0, evaluate_every=1),
            config, tmp_path / "norm-best")  # fmt: skip


def test_streams_differ_by_seed_position_process_and_epoch():
    """Each micro-batch, process and epoch draws its own noise; the same coordinates draw the same."""

    class Process:
        def __init__(self, index: int, count: int) -> None:
            self.process_index, self.num_processes = index, count

    def draw(generator: torch.Generator) -> float:
        return torch.rand(1, generator=generator).item()

    base = draw(micro_batch_generator(1, 4, Process(0, 2)))
    assert base == draw(micro_batch_generator(1, 4, Process(0, 2)))
    others = [micro_batch_generator(2, 4, Process(0, 2)), micro_batch_generator(1, 5, Process(0, 2)),
              micro_batch_generator(1, 4, Process(1, 2))]  # fmt: skip
    assert all(draw(other) != base for other in others)
    assert draw(micro_batch_generator(1, 4, Process(1, 2))) != draw(micro_batch_generator(1, 5, Process(0, 2)))
    assert draw(epoch_generator(1, 0)) != draw(epoch_generator(1, 1)) != draw(epoch_generator(1, 1, stream=1))


def test_step_and_epoch_loops_read_the_run_section():
    """A step trainer evaluates every eval_every_steps (or, without evaluation, checkpoints that often); an
    epoch trainer evaluates every eval_every epochs and checkpoints every epoch, without clipping."""
    run = RunConfig(seed=4, max_epochs=3, max_steps=50, lr=0.02, weight_decay=0.1, warmup_steps=5,
                    gradient_accumulation_steps=2, max_grad_norm=0.7, eval_every_steps=10, patience=6, eval_every=2)  # fmt: skip
    assert step_loop(run) == Loop(seed=4, max_epochs=3, max_steps=50, lr=0.02, weight_decay=0.1, warmup_steps=5,
                                  accumulation=2, max_grad_norm=0.7, evaluate_every=10, patience=6)  # fmt: skip
    quiet = step_loop(run, evaluate=False, early_stop=False)
    assert (quiet.evaluate_every, quiet.checkpoint_every, quiet.patience) == (None, 10, None)
    every = step_loop(run.model_copy(update={"checkpoint_every_steps": 4}), evaluate=False)
    assert (every.evaluate_every, every.checkpoint_every, every.patience) == (None, 4, 6)
    assert step_loop(run.model_copy(update={"checkpoint_every_steps": 4})).checkpoint_every == 4
    assert epoch_loop(run, steps_per_epoch=7) == Loop(seed=4, max_epochs=3, lr=0.02, weight_decay=0.1,
                                                      evaluate_every=14, checkpoint_every=7, patience=6)  # fmt: skip


def test_shuffled_batches_are_one_seeded_permutation_per_epoch():
    """Every row once per epoch, in an order fixed by (seed, epoch)."""
    accelerator = run_accelerator(cpu=True)

    def order(seed: int, epoch: int, batch_size: int = 4) -> list[int]:
        batches = list(shuffled_batches(list(range(10)), batch_size, seed, epoch, accelerator))
        assert [len(batch) for batch in batches] == [batch_size] * (10 // batch_size) + [10 % batch_size] * (
            10 % batch_size > 0
        )
        return [row for batch in batches for row in batch]

    assert all(isinstance(batch, list) for batch in shuffled_batches(list(range(10)), 4, 1, 0, accelerator))

    class Process:  # process 1 of 2: every other batch of the same permutation
        num_processes, process_index, device = 2, 1, torch.device("cpu")

    sharded = [row for batch in shuffled_batches(list(range(12)), 2, 1, 0, Process()) for row in batch]
    whole = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    assert sharded == whole[2:4] + whole[6:8] + whole[10:12]
    first = order(1, 0)
    assert sorted(first) == list(range(10)) and first == order(1, 0, batch_size=3) != list(range(10))
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert order(1, 1) != first and order(1, 1) == order(2, 0)  # the seed and the epoch are summed


def test_a_task_whose_rows_fill_no_batch_is_an_error(config, tmp_path):
    class Empty(Regression):
        def epoch_batches(self, epoch, accelerator):
            return []

    with pytest.raises(DiffRecError, match=r"^regression: the training rows fill no batch on 1 process\(es\)$"):
        fit(Empty(), Loop(seed=0, max_epochs=1), config, tmp_path)


class Clock:
    """A clock the task advances: 0.7 s a micro-batch, 10.0006 s an evaluation (the engine's ``time``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class Timed(Regression):
    """The regression on a scripted clock, with a once-per-epoch phase and state of its own to checkpoint."""

    def __init__(self, clock: Clock, phase: list[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock, self.phase, self.started = clock, list(phase or []), []
        self.drawn = Counter()  # checkpointed through extra_states
        self.evaluations = 0  # checkpointed through state_dict

    def loss(self, model, batch, where):
        self.clock.now += 0.7
        self.drawn.count += 1
        return super().loss(model, batch, where)

    def evaluate(self, model, accelerator):
        self.clock.now += 10.0006
        self.evaluations += 1
        return super().evaluate(model, accelerator)

    def start_epoch(self, epoch, accelerator):
        assert isinstance(accelerator, Accelerator)
        self.started.append(epoch)
        return {"phase": self.phase[epoch]} if self.phase else {}

    def extra_states(self):
        return [self.drawn]

    def state_dict(self):
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state):
        self.evaluations = state.get("evaluations", 0)


class Counter:
    """An object with a state dict, as a model's own optimizer has."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


@pytest.fixture
def clock(monkeypatch):
    import minigpt4.training.engine as engine

    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)
    return clock


def test_timings_leave_out_evaluations_and_count_every_processed_row(config, tmp_path, clock):
    """12 micro-batches of 2 rows at 0.7 s and 4 evaluations at 10.0006 s: 48.402 s in all (to the millisecond),
    40.002 of them evaluating, 24 rows over the other 8.4 s; the curve's seconds run on the same clock."""
    task = Timed(clock, scores=[0.1, 0.2, 0.3, 0.4])
    result = fit(task, Loop(seed=0, max_epochs=2, evaluate_every=3), config, tmp_path / "a")
    assert (result.train_seconds, result.evaluation_seconds, result.samples_per_second) == (48.402, 40.002, 2.857)
    assert [point["seconds"] for point in result.curve] == [12.101, 24.201, 36.302, 48.402]
    state = json.loads((tmp_path / "a" / "checkpoints" / LAST / "trainer_state.json").read_text())
    assert state["samples"] == 24
    assert (state["seconds"], state["evaluation_seconds"]) == pytest.approx((48.4024, 40.0024), abs=1e-9)

    class Idle(Timed):  # every second spent evaluating: no training time to divide by
        def loss(self, model, batch, where):
            self.clock.now -= 0.7
            return super().loss(model, batch, where)

    idle = fit(Idle(clock, scores=[0.1] * 4), Loop(seed=0, max_epochs=2, evaluate_every=3), config, tmp_path / "b")
    assert (idle.train_seconds, idle.evaluation_seconds, idle.samples_per_second) == (40.002, 40.002, None)
    assert [point["seconds"] for point in idle.curve] == [10.001, 20.001, 30.002, 40.002]


def test_a_resumed_run_keeps_its_clock_phases_and_task_state(config, tmp_path, clock):
    """Checkpoints every 4 steps; a crash at micro-batch 10 resumes mid-epoch 2 from step 8: the epoch's phase is
    not run again, the task's own state and extra states come back, and the run ends with the uninterrupted
    run's curve (seconds included), timings and counts."""
    loop = Loop(seed=2, max_epochs=3, lr=0.05, evaluate_every=4, checkpoint_every=4, log_every=2)
    phases = [1.0, 2.0, 4.0]
    whole = Timed(clock, phases, scores=[0.3, 0.1, 0.2, 0.2, 0.25])
    expected = fit(whole, loop, config, tmp_path / "whole")
    assert whole.started == [0, 1, 2] and whole.drawn.count == 18 and whole.evaluations == 5
    final = json.loads((tmp_path / "whole" / "checkpoints" / LAST / "trainer_state.json").read_text())
    assert final["step"] == 18  # the last step is checkpointed though 18 is no multiple of 4
    assert [point.get("phase") for point in expected.curve] == [1.0, None, None, 2.0, None, None, 4.0, None, None]

    clock.now = 1000.0
    with pytest.raises(Stop):
        fit(Timed(clock, phases, scores=[0.3, 0.1, 0.2], crash_at=10), loop, config, tmp_path / "crashed")
    resumed_task = Timed(clock, phases, scores=[0.2, 0.2, 0.25])
    resumed = fit(resumed_task, loop, config, tmp_path / "resumed", tmp_path / "crashed" / "checkpoints" / LAST)
    assert resumed_task.started == [2] and resumed_task.drawn.count == 18 and resumed_task.evaluations == 5
    assert resumed.curve == expected.curve and resumed.best_step == expected.best_step == 4
    assert (resumed.train_seconds, resumed.evaluation_seconds, resumed.samples_per_second) == (
        expected.train_seconds,
        expected.evaluation_seconds,
        expected.samples_per_second,
    )
    # the best (step 4's) was written before the crash and never beaten: the resumed run keeps a copy
    kept = load_file(tmp_path / "resumed" / "checkpoints" / BEST / "w.safetensors")["weight"]
    assert torch.equal(kept, whole.evaluated[0])


def test_a_checkpoint_from_before_evaluations_were_timed_resumes_with_timings_missing(config, tmp_path, clock):
    loop = Loop(seed=0, max_epochs=2, checkpoint_every=3)
    with pytest.raises(Stop):
        fit(Timed(clock, crash_at=7), loop, config, tmp_path / "old")
    state_file = tmp_path / "old" / "checkpoints" / LAST / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["evaluation_seconds"], state["task"]
    state_file.write_text(json.dumps(state))
    resumed_task = Timed(clock)
    resumed = fit(resumed_task, loop, config, tmp_path / "new", state_file.parent)
    assert (
        resumed_task.evaluations == 0
        and resumed.steps == 12
        and resumed.evaluation_seconds is None
        and resumed.samples_per_second is None
    )


def test_epoch_phases_join_the_curve_and_a_non_finite_one_stops_the_run(config, tmp_path, clock):
    whole = fit(Timed(clock, [1.0, 2.0, 4.0]), Loop(seed=0, max_epochs=3, log_every=18), config, tmp_path / "a")
    assert whole.curve[0]["phase"] == pytest.approx(7 / 3)  # one point: the mean of the three epochs' phases
    with pytest.raises(DiffRecError, match=r"^phase became nan at epoch 2, step 6; training stopped, the last "
                       r"checkpoint is kept at .*checkpoints/last$"):  # fmt: skip
        fit(Timed(clock, [1.0, math.nan]), Loop(seed=0, max_epochs=2, checkpoint_every=6), config, tmp_path / "b")


def test_checkpoints_hold_the_tasks_weights_in_its_format_and_frozen_weights_stay(config, tmp_path):
    """Accelerate's own model file is replaced by the task's; nothing is left half-written; a frozen tensor is
    neither optimized nor changed, and the trainable tensors come in name order."""
    task = Regression()
    task.model.bias.requires_grad_(False)
    bias = task.model.bias.detach().clone()
    fresh = Regression()
    assert [id(param) for param in fresh.trainable()] == [id(fresh.model.bias), id(fresh.model.weight)]
    assert [id(param) for param in task.trainable()] == [id(task.model.weight)]
    stale = tmp_path / "checkpoints" / f"{LAST}.partial"  # what a process killed mid-save leaves
    stale.mkdir(parents=True)
    (stale / "stale.bin").write_bytes(b"")
    fit(task, Loop(seed=0, max_epochs=1, lr=0.1), config, tmp_path)
    last = tmp_path / "checkpoints" / LAST
    files = {path.name for path in last.iterdir()}
    assert {"w.safetensors", "config.yaml", "trainer_state.json", "optimizer.bin"} <= files
    assert not any(name.startswith("model") for name in files) and "stale.bin" not in files, files
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [LAST]
    assert torch.equal(task.model.bias, bias) and torch.equal(load_file(last / "w.safetensors")["bias"], bias)
    assert len(torch.load(last / "optimizer.bin", weights_only=False)["state"]) == 1


def test_the_run_logs_its_size_resume_and_early_stop(config, tmp_path, capsys):
    from minigpt4.training.run_folder import logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        loop = Loop(seed=0, max_epochs=2, evaluate_every=2, patience=2)
        with pytest.raises(Stop):
            fit(Regression(scores=[0.5, 0.1, 0.2], crash_at=5), loop, config, tmp_path / "a")
        resumed = fit(
            Regression(scores=[0.1, 0.1]), loop, config, tmp_path / "b", tmp_path / "a" / "checkpoints" / LAST
        )
    finally:
        logger.removeHandler(handler)
    assert resumed.steps == 6
    messages = [record.getMessage() for record in records]
    assert messages.count("regression: 2 trainable tensors, 4 parameters; 12 optimizer steps (6 per epoch)") == 2
    assert f"resumed from {tmp_path / 'a' / 'checkpoints' / LAST} at step 4 (epoch 0, batch 4)" in messages
    assert "step 2: score 0.5000 (best)" in messages
    assert any(message.startswith('step 4: {"step": 4, "epoch": 0, "seconds": ') for message in messages)
    assert "early stop at step 6: score has not improved for 2 evaluations" in messages
    bar = capsys.readouterr().err
    assert "train regression" in bar and "6/12" in bar and "score=0.1000" in bar


def test_the_curve_and_the_loop_go_to_tensorboard(config, tmp_path):
    """Each curve point's figures at its step, and the learning rate and seed as the run's hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = run_accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    task, loop = Regression(scores=[0.2, 0.4, 0.3]), Loop(seed=4, max_epochs=1, lr=0.01, evaluate_every=2)
    result = Engine(task, loop, accelerator, config, tmp_path).fit()
    accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for name in ("loss", "abs", "score", "seconds"):
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert logged == [(point["step"], pytest.approx(point[name])) for point in result.curve], name
    (hparams,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == {"lr": 0.01, "seed": 4}


def test_a_task_saves_and_loads_through_its_models_own_format(tmp_path):
    class Model(nn.Linear):
        def save_weights(self, folder: Path) -> None:
            save_file({"weight": self.weight.detach().contiguous()}, folder / "own.safetensors")

        def load_weights(self, folder: Path) -> None:
            self.weight.data.copy_(load_file(folder / "own.safetensors")["weight"])

    class Default(Task):
        name = "default"

        def __init__(self, seed: int) -> None:
            torch.manual_seed(seed)
            self.model = Model(2, 1, bias=False)

        def epoch_batches(self, epoch, accelerator):
            return []

        def loss(self, model, batch, where):
            return {}

    saved, loaded = Default(0), Default(1)
    saved.save_weights(tmp_path)
    loaded.load_weights(tmp_path)
    assert torch.equal(loaded.model.weight, saved.model.weight) and loaded.batches_per_epoch(None) == 0
