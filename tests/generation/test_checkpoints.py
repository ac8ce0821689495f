"""When in-generation checkpoints are taken: by steps or by a time budget, never at the last step,
and the same decision on every rank."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import TrainerControl, TrainerState

from incr_ray.generation.checkpoints import CheckpointCadence, checkpoint_due, checkpointing, folder_figures


def test_a_step_cadence_saves_every_n_steps_but_not_at_the_last():
    due = [s for s in range(1, 11) if checkpoint_due(s, 10, every_steps=2, every_s=60.0, since_last_s=1e9)]
    assert due == [2, 4, 6, 8]  # steps win over the time budget; step 10 is the final model's save


def test_a_time_budget_saves_once_it_is_spent():
    assert not checkpoint_due(5, 100, every_steps=0, every_s=1800.0, since_last_s=1799.0)
    assert checkpoint_due(5, 100, every_steps=0, every_s=1800.0, since_last_s=1800.0)
    assert not checkpoint_due(100, 100, every_steps=0, every_s=1800.0, since_last_s=1e9)  # the last step
    assert not checkpoint_due(5, 100, every_steps=0, every_s=0.0, since_last_s=1e9)  # 0: off
    assert checkpointing(0, 30.0) and checkpointing(2, 0.0) and not checkpointing(0, 0.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(cadence: CheckpointCadence, clock: Clock, max_steps: int, minutes_per_step: float) -> list[int]:
    """Drive the callback as the Trainer does; returns the steps it saved after."""
    args, state, saved = SimpleNamespace(device="cpu"), TrainerState(max_steps=max_steps), []
    cadence.on_train_begin(args, state, TrainerControl())
    for step in range(1, max_steps + 1):
        clock.now += minutes_per_step * 60
        state.global_step, control = step, TrainerControl()
        cadence.on_step_end(args, state, control)
        if control.should_save:
            saved.append(step)
            clock.now += 5 * 60  # a slow save does not count toward the next budget
            cadence.on_save(args, state, control)
    return saved


def test_the_cadence_saves_after_each_budget_of_training_time():
    clock = Clock()
    asked = []

    def rank0(flag, device):  # what every rank would get: rank 0's decision
        asked.append(flag)
        return flag

    cadence = CheckpointCadence(every_steps=0, every_minutes=30, clock=clock, decide=rank0)
    clock.now = 1e6  # the callback is made long before train() begins: the budget starts there
    assert _steps(cadence, clock, max_steps=100, minutes_per_step=1) == [30, 60, 90]
    assert len(asked) == 99  # every step but the last asks rank 0, so that all ranks save together
    assert _steps(CheckpointCadence(0, 30, clock=clock, decide=rank0), clock, 20, 1) == []  # a short one: none


def test_the_ranks_follow_rank_0s_decision():
    clock = Clock()
    never = CheckpointCadence(every_steps=0, every_minutes=1, clock=clock, decide=lambda flag, device: False)
    assert _steps(never, clock, max_steps=10, minutes_per_step=5) == []  # rank 0 said no: this rank's clock is ignored
    told = CheckpointCadence(every_steps=0, every_minutes=60, clock=clock, decide=lambda flag, device: True)
    assert _steps(told, clock, max_steps=4, minutes_per_step=0) == [1, 2, 3]


def test_a_step_cadence_needs_no_collective():
    def refuse(flag, device):
        raise AssertionError("a step cadence is the same on every rank: no broadcast")

    clock = Clock()
    assert _steps(CheckpointCadence(every_steps=3, every_minutes=30, clock=clock, decide=refuse), clock, 10, 60) == [3, 6, 9]


def test_folder_figures_say_whether_a_model_file_was_saved(tmp_path):
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    (tmp_path / "trainer_state.json").write_text("{}")
    assert folder_figures(str(tmp_path)) == (102, False)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 10)
    assert folder_figures(str(tmp_path)) == (112, True)
