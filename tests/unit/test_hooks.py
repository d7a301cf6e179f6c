"""The training loop's hooks (megatron_vwn/training/hooks.py, docs/training_loop.md): called in
list order after every step, a stop ends the loop after the step's remaining hooks, and the
hooks do what the loop did inline before them."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_vwn.training.hooks import Checkpointing, LoopState, TrainLog, run_loop
from megatron_vwn.training.step import StepResult


def _state(iteration: int = 0, total: int = 4) -> LoopState:
    return LoopState(iteration=iteration, start_iteration=iteration, total_iters=total,
                     global_batch_size=2, seq_length=8)


def _result(loss: float = 1.0) -> StepResult:
    return StepResult(losses={"lm_loss": loss}, tokens=16, grad_norm=0.5, lr=1e-3)


class Recorder:
    def __init__(self, name: str, calls: list, stop_at: int | None = None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def on_step_end(self, state: LoopState, result: StepResult) -> None:
        self.calls.append((state.iteration, self.name, state.last))
        if state.iteration == self.stop_at:
            state.stop = True


def test_hooks_run_in_list_order_after_every_step():
    calls: list = []
    state = _state(iteration=1, total=4)  # resumed at 1
    run_loop(state, _result, [Recorder("a", calls), Recorder("b", calls)])
    assert calls == [(2, "a", False), (2, "b", False), (3, "a", False), (3, "b", False),
                     (4, "a", True), (4, "b", True)]
    assert state.iteration == 4 and not state.stop


def test_a_stop_ends_the_loop_after_the_remaining_hooks():
    calls: list = []
    state = _state()
    run_loop(state, _result, [Recorder("a", calls, stop_at=2), Recorder("b", calls)])
    assert calls == [(1, "a", False), (1, "b", False), (2, "a", False), (2, "b", False)]
    assert state.stop and state.iteration == 2


class FakeMetrics:
    def __init__(self):
        self.rows: list = []

    def log_train(self, row: dict, start_iteration: int) -> None:
        self.rows.append((row, start_iteration))


class FakeMoE:
    def collect(self, steps: int) -> dict:
        return {}


def test_train_log_averages_the_window_and_logs_the_last_step():
    metrics = FakeMetrics()
    log = TrainLog(metrics, interval=2, flops_per_token=1e12, world_size=1, moe_monitor=FakeMoE())
    state = _state(total=3)
    losses = iter([3.0, 1.0, 5.0])
    run_loop(state, lambda: _result(next(losses)), [log])
    assert [(row["iteration"], row["lm_loss"], start) for row, start in metrics.rows] == [
        (2, 2.0, 0), (3, 5.0, 0)]
    row = metrics.rows[0][0]
    assert row["lr"] == 1e-3 and row["consumed_tokens"] == 2 * 16 and row["skipped"] is False


class FakeCheckpoints:
    def __init__(self, interval: int):
        self.interval = interval
        self.saved: list = []
        self.polls = 0

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def save(self, state, model, optimizer, scheduler, final: bool = False) -> bool:
        self.saved.append((state.iteration, final))
        return True

    def poll(self) -> None:
        self.polls += 1


def _signals(stop_at: int | None, state: LoopState):
    return SimpleNamespace(stop_requested=lambda: state.iteration == stop_at, received=None)


def test_checkpointing_saves_on_cadence_and_at_the_end():
    checkpoints = FakeCheckpoints(interval=2)
    state = _state(total=5)
    run_loop(state, _result, [Checkpointing(checkpoints, _signals(None, state), [], None, None)])
    assert checkpoints.saved == [(2, False), (4, False), (5, True)]
    assert checkpoints.polls == 2


def test_a_stop_signal_saves_a_final_checkpoint_and_stops():
    checkpoints = FakeCheckpoints(interval=10)
    state = _state(total=5)
    calls: list = []
    hooks = [Checkpointing(checkpoints, _signals(3, state), [], None, None),
             Recorder("after", calls)]
    run_loop(state, _result, hooks)
    assert checkpoints.saved == [(3, True)]
    assert state.iteration == 3 and state.stop
    assert calls[-1] == (3, "after", False)
