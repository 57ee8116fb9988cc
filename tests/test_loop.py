"""The step driver (`lib/loop.py`) on a toy loop, and what every real loop inherits from it: the
bounded run-ahead (fine-tuning included), the one stop convention, checkpoints announced once
committed, metric rows, non-finite checks."""
import dataclasses
import os
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.data import datasets
from bow_jax.lib import checkpoint, logs, loop, stop, writers
from bow_jax.protocols import semisupervised
from bow_jax.tasks import finetune as finetune_task
from test_finetune import small_backbone  # tests/ is on sys.path (pytest's rootdir import mode)


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    w: jax.Array


def toy_loop(tmp_path, total=6, every=4, hooks=(), lr=0.5, **changes):
    """A loop that pulls w towards each batch's mean: w <- w - lr (w - mean(batch))."""
    def step_fn(state, batch):
        loss = jnp.mean((state.w - batch) ** 2)
        w = state.w - lr * (state.w - jnp.mean(batch))
        return ToyState(state.step + 1, w), {"loss": loss}

    step = jax.jit(step_fn, donate_argnums=0)
    batches = (jnp.full((4,), float(i)) for i in range(100))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5)
    return loop.Loop(step=lambda s, b, i: step(s, b), batches=batches, total_steps=total,
                     images_per_step=4, title="toy", workdir=str(tmp_path), log_every=2,
                     checkpointer=ckpt, checkpoint_every=every, settings={"toy": 1},
                     hooks=tuple(hooks), **changes)


def initial():
    return ToyState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))


def test_driver_rows_checkpoints_and_their_lines(tmp_path, capsys, monkeypatch):
    """Rows every 2 steps (and the last) in metrics.jsonl; checkpoints at 4 and at the end, each
    announced once, after it was committed (the folder exists when the line is printed)."""
    toy = toy_loop(tmp_path)
    committed, real_say = [], logs.say

    def say(message):  # each checkpoint line is printed once its folder is on disk
        if "checkpoint:" in message:
            committed.append(os.path.isdir(message.rsplit(" -> ", 1)[1]))
        real_say(message)

    monkeypatch.setattr(logs, "say", say)
    try:
        final = loop.run(toy, initial())
    finally:
        toy.checkpointer.close()
    assert int(final.step) == 6
    rows = writers.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 6]
    # loss of step i (0-based) is (w_i - i)^2; the row holds the mean over its 2 steps.
    w, losses = 0.0, []
    for i in range(6):
        losses.append((w - i) ** 2)
        w -= 0.5 * (w - i)
    np.testing.assert_allclose([r["loss"] for r in rows],
                               [np.mean(losses[k:k + 2]) for k in (0, 2, 4)], rtol=1e-6)
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if "checkpoint:" in line]
    assert lines == [f"toy: checkpoint: step {s}/6 -> {tmp_path / 'checkpoints' / str(s)}"
                     for s in (4, 6)]
    assert committed == [True, True]
    assert sum(line.startswith("toy: step ") for line in out) == 3


def test_a_stop_saves_commits_and_raises_stopped(tmp_path):
    """SIGTERM after step 3: step 3 is saved and committed before stop.Stopped is raised; the
    same loop resumes at 3 and ends where an uninterrupted one does."""
    def sigterm_at_3(done):
        if done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    toy = toy_loop(tmp_path / "a", hooks=[sigterm_at_3])
    with pytest.raises(stop.Stopped, match=r"^toy stopped by a signal at step 3/6, saved in "
                                           r".*checkpoints/3; the same command resumes it\.$"):
        loop.run(toy, initial())
    assert toy.checkpointer.all_steps() == [3]  # committed before the exception
    restored = toy.checkpointer.restore(checkpoint.abstract_like(initial()))
    toy.checkpointer.close()
    resumed_loop = toy_loop(tmp_path / "a")
    for _ in range(3):
        next(resumed_loop.batches)  # the batches of steps 3, 4, ...
    resumed = loop.run(resumed_loop, restored)
    resumed_loop.checkpointer.close()
    straight_loop = toy_loop(tmp_path / "b")
    straight = loop.run(straight_loop, initial())
    straight_loop.checkpointer.close()
    assert float(resumed.w) == float(straight.w) and int(resumed.step) == 6


NONE_YET = r"no checkpoint was saved yet: nothing saved is lost, and a rerun starts over\."


@pytest.mark.parametrize("lr, every, expected, kept", [
    (1e30, 4, r"^Non-finite metrics at step 4 of the toy: loss .*\) hold NaN or infinity\. "
              r"Stopped; " + NONE_YET + r" Lower the toy's lr\.$", []),
    (1e30, 1, r"^Step 3: the state holds NaN or infinity in 1 leaves \(w\); not saved\. The newest "
              r"kept checkpoint \(2\) is the last good one\. Lower the toy's lr\.$", [1, 2]),
    (float("inf"), 1, r"^Step 1: the state holds NaN or infinity in 1 leaves \(w\); not saved\. "
                      r"N" + NONE_YET[1:] + r" Lower the toy's lr\.$", [])])
def test_non_finite_values_stop_before_anything_bad_is_saved(tmp_path, lr, every, expected, kept):
    """lr 1e30: w reaches 1e30 after step 2 and overflows at step 3. Checkpoints every 4 steps:
    the row of step 4 holds an infinite loss (NonFiniteError naming the step, the metric, and that
    no checkpoint was saved yet: a fresh user read 'step None'); every step: the state of step 3
    is refused before it is saved, naming the last good checkpoint. lr inf: the state of step 1
    is NaN, refused with no checkpoint yet (was 'The newest kept checkpoint (None)'). The loop's
    advice is appended either way, and only finite states are on disk."""
    toy = toy_loop(tmp_path, lr=lr, every=every, advice="Lower the toy's lr.")
    with pytest.raises(checkpoint.NonFiniteError, match=expected) as raised:
        loop.run(toy, initial())
    saved = toy.checkpointer.all_steps()
    toy.checkpointer.close()
    assert saved == kept and "None" not in str(raised.value)


def test_non_finite_metrics_of_a_loop_without_checkpoints_say_so(tmp_path):
    """A loop that saves nothing (checkpointer None) says so rather than 'step None'."""
    saving = toy_loop(tmp_path, lr=1e30, advice="Lower the toy's lr.")
    saving.checkpointer.close()
    toy = dataclasses.replace(saving, checkpointer=None)
    with pytest.raises(checkpoint.NonFiniteError, match=r"Stopped; this loop saves no "
                                                        r"checkpoints\. Lower the toy's lr\.$"):
        loop.run(toy, initial())


class CountingRunAhead(loop.RunAhead):
    """`loop.RunAhead` that records how many steps were in flight after each dispatch."""
    seen = []

    def after_dispatch(self, metrics) -> None:
        super().after_dispatch(metrics)
        CountingRunAhead.seen.append(len(self._pending))


def test_finetune_keeps_at_most_the_bounded_number_of_steps_in_flight(tmp_path, monkeypatch):
    """Fine-tuning goes through the driver: never more than RUN_AHEAD_STEPS steps queued (before
    the driver, fine-tuning queued every step of an epoch)."""
    monkeypatch.setattr(loop, "RunAhead", CountingRunAhead)
    CountingRunAhead.seen = []
    train = datasets.load_digits("train", image_size=8)
    test = datasets.load_digits("test", image_size=8).subset(np.arange(40))
    backbone = small_backbone((1,), width=4)
    variables = jax.device_get(jax.jit(
        lambda k: backbone.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(jax.random.key(0)))
    cfg = finetune_task.default_config()
    cfg.update(dict(preset="10percent", epochs=1, batch_size=16, eval_every=1))
    semisupervised.finetune(backbone, variables, train, test, cfg, (0.5,) * 3, (0.25,) * 3,
                            checkpoint_dir=str(tmp_path / "checkpoints"))
    assert len(CountingRunAhead.seen) == 8 and max(CountingRunAhead.seen) <= loop.RUN_AHEAD_STEPS
    assert writers.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["step"] == 8


def test_outside_the_loops_a_signal_is_a_planned_stop_and_a_loop_still_saves_first(tmp_path):
    """A fresh user's attack: SIGTERM during evaluation ended the process with status 143 and
    nothing said. Under `stop.signals_stop_at_once` (main.py wraps every task in it) it raises
    stop.Stopped at once; inside it a loop's own handler still saves its step first, and the
    outer handler is back after the loop."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stop.Stopped, match=r"^the evaluate task stopped by signal 15 outside"):
        with stop.signals_stop_at_once("the evaluate task"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) == before

    def sigterm_at_2(done):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with stop.signals_stop_at_once("the train task"):
        toy = toy_loop(tmp_path, hooks=[sigterm_at_2])
        with pytest.raises(stop.Stopped, match=r"^toy stopped by a signal at step 2/6, saved"):
            loop.run(toy, initial())
        assert toy.checkpointer.all_steps() == [2]
        toy.checkpointer.close()
        assert signal.getsignal(signal.SIGTERM) is not before  # the outer handler, back
    assert signal.getsignal(signal.SIGTERM) == before
