"""bow_jax.lib.profiling: a real jax.profiler trace of a window of steps, the window's
boundaries, and the parameter overview against a hand count."""
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bow_jax import config as config_lib
from bow_jax.lib import profiling
from bow_jax.lib.errors import InputError


def _run(window, steps, outputs=None):
    """A driver's use of the hook: called after every step, closed however the loop ends."""
    try:
        for done in range(1, steps + 1):
            window(done, outputs)
    finally:
        window.close()


@pytest.fixture
def calls(monkeypatch):
    """Records start/stop of the profiler (with the folder) instead of tracing."""
    log = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda folder: log.append(("start", folder)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: log.append(("stop",)))
    return log


def test_real_trace_of_a_jitted_step(tmp_path, capsys):
    step = jax.jit(lambda x: jnp.tanh(x @ x.T) + 1.0)
    x = jnp.ones((32, 32))
    window = profiling.TraceWindow(str(tmp_path), start_step=1, num_steps=2)
    try:
        for done in range(1, 5):
            x = step(x)
            window(done, x)
            assert window.active == (done in (1, 2))
    finally:
        window.close()
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert capsys.readouterr().out == (
        f"profile: steps 1-2 traced -> {tmp_path / 'profile'} "
        f"(view: tensorboard --logdir={tmp_path / 'profile'})\n")
    jax.profiler.start_trace(str(tmp_path / "again"))  # raises if ours were still running
    jax.profiler.stop_trace()


def test_window_starts_and_stops_at_its_steps(tmp_path, calls):
    window = profiling.TraceWindow(str(tmp_path), start_step=3, num_steps=2)
    events = []
    for done in range(1, 9):
        before = len(calls)
        window(done)
        events += [(call[0], done) for call in calls[before:]]
    window.close()
    # Steps 3 and 4 (0-based) traced: started once 3 steps are done, stopped once 5 are.
    assert events == [("start", 3), ("stop", 5)] and len(calls) == 2


def test_loop_ending_inside_the_window_stops_the_trace(tmp_path, calls, capsys):
    window = profiling.TraceWindow(str(tmp_path), start_step=2, num_steps=10)
    _run(window, steps=4)
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)] and not window.active
    assert "profile: steps from 2 on traced" in capsys.readouterr().out
    window.close()  # a second close is a no-op
    assert len(calls) == 2


def test_loop_stopping_by_an_error_inside_the_window_stops_the_trace(tmp_path, calls):
    window = profiling.TraceWindow(str(tmp_path), start_step=1, num_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        with window:
            window(1)
            raise RuntimeError("boom")
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)]


def test_resumed_run_traces_the_rest_of_the_window_once(tmp_path, calls):
    window = profiling.TraceWindow(str(tmp_path), start_step=10, num_steps=5)
    for done in [13, 14, 15, 16, 10, 11]:  # resumed at 12; later steps never restart it
        window(done)
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)]


@pytest.mark.parametrize("start, num", [(10, 0), (0, 0)])
def test_zero_steps_is_off(tmp_path, calls, start, num):
    _run(profiling.TraceWindow(str(tmp_path), start, num), steps=20)
    assert calls == []


def test_from_config_and_negative_settings(tmp_path):
    config = config_lib.base_config("rotnet")
    config.profile_start_step, config.profile_num_steps = 7, 3
    window = profiling.TraceWindow.from_config(config, str(tmp_path))
    assert (window.start_step, window.stop_step) == (7, 10)
    with pytest.raises(InputError, match=r"config\.profile_start_step=-1"):
        profiling.TraceWindow(str(tmp_path), -1, 3)
    with pytest.raises(InputError, match=r"config\.profile_num_steps=-2"):
        profiling.TraceWindow(str(tmp_path), 0, -2)


def test_each_process_writes_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert profiling.trace_dir(str(tmp_path)) == str(tmp_path / "profile" / "process_2")


class _Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))  # 3*3*2*4 + 4 = 76
        return nn.LayerNorm(name="norm")(x)  # scale 4 + bias 4 = 8


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _Backbone(name="backbone")(x).mean(axis=(1, 2))
        return nn.Dense(5, name="head")(x)  # 4*5 + 5 = 25


def test_parameter_overview_counts_by_hand():
    shapes = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    text = profiling.parameter_overview(shapes["params"])
    assert text.splitlines() == ["parameters: 109",
                                 "  backbone   84",
                                 "  head       25"]
    extra = {"backbone": shapes["params"]["backbone"], "kappa": jnp.float32(5.0)}
    assert profiling.parameter_overview(extra).splitlines()[0] == "parameters: 85"


def test_parameter_overview_table():
    variables = _Tiny().init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    text = profiling.parameter_overview(variables["params"], table=True)
    assert "backbone/conv/kernel" in text and "(3, 3, 2, 4)" in text and "Total: 109" in text
    with pytest.raises(TypeError, match="dict of parameters"):
        profiling.parameter_overview([1, 2])


def test_clu_parameter_overview_imports_no_tensorflow():
    # Why clu serves the overview but not writers / periodic actions: this import pulls in no
    # TensorFlow (those do). A fresh process, since other tests may have imported TensorFlow.
    code = ("import sys, bow_jax.lib.profiling; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tensorboard'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
