"""lib/writers.py, lib/files.py, lib/logs.py, lib/extras.py: what a run leaves on disk and prints.

Event files are read back by an independent TFRecord reader written here (framing and masked
CRC-32C from the TFRecord format description), so neither the writer's own code nor TensorFlow
is trusted to check them.
"""
import io
import json
import logging
import os
import stat
import struct
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import logging as absl_logging

import bow_jax
from bow_jax.lib import extras, files, logs, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- files: permissions and config.json ------------------------------------------------------

@pytest.fixture
def umask():
    """Sets the process umask for a test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_has_the_mode_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w", encoding="utf-8") as f:  # the reference
        f.write("x")
    files.atomic_write_text(str(tmp_path / "eval" / "results.json"), "{}")
    with files.atomic_open(str(tmp_path / "weights.bin"), "wb") as f:
        f.write(b"\0")
    assert _mode(tmp_path / "eval" / "results.json") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "weights.bin") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert files.current_umask() == mask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "results.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    files.atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and _mode(path) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]  # no temporary left


def test_write_config_json_writes_the_resolved_config(tmp_path, umask):
    umask(0o022)
    config = ml_collections.ConfigDict({"method": "obow", "model": {"kwargs": {}},
                                        "optim": {"lr": 0.05, "milestones": (3, 6)}})
    config.lock()
    path = files.write_config_json(str(tmp_path / "run"), config)
    assert path == str(tmp_path / "run" / "config.json")
    text = open(path, encoding="utf-8").read()
    assert json.loads(text) == {"method": "obow", "optim": {"lr": 0.05, "milestones": [3, 6]},
                                "model": {"kwargs": {}}}
    assert text.startswith('{\n  "method"') and text.endswith("}\n")  # indent 2, sorted keys
    assert _mode(path) == 0o644


# ---- TensorBoard event files without TensorFlow --------------------------------------------

def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path):
    """TFRecord framing: uint64 length, masked CRC of the length, data, masked CRC of the data."""
    records, blob = [], open(path, "rb").read()
    while blob:
        header, blob = blob[:12], blob[12:]
        length, length_crc = struct.unpack("<QI", header)
        assert length_crc == _masked(_crc32c(header[:8]))
        data, (data_crc,), blob = blob[:length], struct.unpack("<I", blob[length:length + 4]), \
            blob[length + 4:]
        assert data_crc == _masked(_crc32c(data))
        records.append(data)
    return records


def _event_pb2():
    try:  # tensorboard's copy of the schema, independent of the writer's package
        from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
    except ImportError:
        from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    return event_pb2


def _scalars(workdir):
    """{tag: [(step, value)]} from every event file in `workdir`."""
    found = {}
    for name in sorted(os.listdir(workdir)):
        if not name.startswith("events.out.tfevents."):
            continue
        for record in _read_records(os.path.join(workdir, name)):
            event = _event_pb2().Event.FromString(record)
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else \
                    value.tensor.float_val[0]
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def test_crc32c_reference_is_right():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


def test_metric_writer_writes_stdout_jsonl_and_event_files(tmp_path, capsys):
    writer = writers.MetricWriter(str(tmp_path))
    writer.write_scalars(10, {"loss": 2.5, "lr": 0.1})
    writer.write_scalars(20, {"loss": 1.25, "lr": 0.1, "steps_per_s": 4.0, "images_per_s": 256.0,
                              "eta_min": 2.0})
    writer.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 10: loss=2.5, lr=0.1",
                   "step 20: loss=1.25, lr=0.1 | 4 steps/s, 256 images/s, ETA 2 min"]
    assert writers.read_jsonl(str(tmp_path / "metrics.jsonl"))[0] == {"step": 10, "loss": 2.5,
                                                                      "lr": 0.1}
    scalars = _scalars(str(tmp_path))
    assert scalars["loss"] == [(10, 2.5), (20, 1.25)]
    assert scalars["eta_min"] == [(20, 2.0)]


def test_writers_import_and_write_without_tensorflow_or_torch(tmp_path):
    """A core install has neither: both are made unimportable in a fresh interpreter."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None
        sys.modules["torch"] = None
        from bow_jax.lib import writers
        w = writers.MetricWriter({str(tmp_path)!r})
        w.write_scalars(3, {{"loss": 0.5}})
        w.close()
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert _scalars(str(tmp_path)) == {"loss": [(3, 0.5)]}


def test_format_duration():
    assert [writers.format_duration(s) for s in (4.24, 42, 1020, 11520)] == \
        ["4.2 s", "42 s", "17 min", "3.2 h"]


# ---- progress of long phases ----------------------------------------------------------------

def test_progress_without_a_terminal_is_silent_for_short_phases(capsys):
    assert list(writers.progress(range(5), desc="features", unit="batch")) == list(range(5))
    assert capsys.readouterr().out == ""


def test_progress_without_a_terminal_reports_long_phases_with_rate_and_eta(capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 40))  # 40 s per item
    monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
    assert list(writers.progress(range(5), desc="features", unit="batch", every_s=60)) == \
        list(range(5))
    lines = capsys.readouterr().out.splitlines()
    # A line after 80 s (2 items), one after 160 s (4 items), and the end line.
    assert lines[0] == "features: 2 of 5 batch in 1 min (0.025 batch/s, ETA 2 min)"
    assert lines[1].startswith("features: 4 of 5 batch in ")
    assert lines[-1] == "features: 5 of 5 batch in 4 min (0.0208 batch/s)"  # no ETA at the end
    assert len(lines) == 3


def test_progress_says_where_a_phase_stopped_early(capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 20))
    monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
    for i in writers.progress(iter(range(10)), total=10, desc="probe", every_s=1000):
        if i == 2:
            break
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("probe: 3 of 10 it in ") and lines[-1].endswith("(stopped early)")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_shows_a_tqdm_bar_with_rate(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(writers.progress([1, 2, 3], desc="kmeans")) == [1, 2, 3]
    bar = terminal.getvalue()
    assert "kmeans" in bar and "/3" in bar and "it/s" in bar  # cleared when done (leave=False)
    assert capsys.readouterr().out == ""


# ---- logs: library chatter off, our lines on -----------------------------------------------

@pytest.fixture
def restore_logging(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setattr(bow_jax, "USER_TF_CPP_MIN_LOG_LEVEL", None)
    names = ("",) + logs.LIBRARY_LOGGERS
    saved = {n: logging.getLogger(n).level for n in names}
    verbosity = absl_logging.get_verbosity()
    yield
    logs.setup(None)  # back to the default quiet state, then to this process's levels
    absl_logging.set_verbosity(verbosity)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_logs_setup_quiets_libraries_unless_verbosity_is_given(restore_logging):
    logs.setup(None)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and logs.is_quiet()
    for name in ("orbax.checkpoint.checkpoint_manager", "jax._src.xla_bridge", "absl"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    logs.setup(0)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and not logs.is_quiet()
    assert logging.getLogger("orbax.checkpoint").isEnabledFor(logging.INFO)
    assert not logging.getLogger("orbax.checkpoint").isEnabledFor(logging.DEBUG)
    logs.setup(1)
    assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize("user_level, want", [(None, "2"), ("0", "0")])
def test_the_quiet_tf_log_level_survives_importing_jax(user_level, want):
    """`import jax` sets TF_CPP_MIN_LOG_LEVEL=1 when it is unset (TensorFlow's C++ warnings, e.g.
    'Local rendezvous is aborting', would then print): a fresh process that imports the entry
    point gets the quiet level 2 unless the user set a level before starting it."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    code = ("import os, bow_jax.main, jax; from bow_jax.lib import logs; "
            f"assert os.environ.get('TF_CPP_MIN_LOG_LEVEL') == {user_level or '1'!r}; "
            "logs.setup(None); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == want


def test_say_and_warn(capsys):
    logs.say("saved checkpoint 10")
    logs.warn("falling back to step 5")
    captured = capsys.readouterr()
    assert captured.out == "saved checkpoint 10\n"
    assert captured.err == "warning: falling back to step 5\n"


def test_quiet_native_stderr_hides_file_descriptor_2_only_while_quiet(capfd, restore_logging):
    logs.setup(None)
    with logs.quiet_native_stderr():
        os.write(2, b"oneDNN banner\n")
    logs.setup(0)
    with logs.quiet_native_stderr():
        os.write(2, b"shown\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "shown\nafter\n"


# ---- extras: a missing optional dependency names its extra ---------------------------------

def test_require_returns_an_installed_module():
    assert extras.require("json", "tfds") is json


def test_require_names_the_extra_of_a_missing_module():
    with pytest.raises(ImportError) as info:
        extras.require("tensorflow_nonexistent_xyz", "tfds", purpose="config.data.source='tfds'")
    message = str(info.value)
    assert message.startswith("tensorflow_nonexistent_xyz is not installed "
                              "(config.data.source='tfds' needs it)")
    assert "pip install 'bow_jax[tfds]'" in message
    assert "\n" not in message


def test_require_lets_a_broken_dependency_through(tmp_path, monkeypatch):
    """An installed module whose own import fails is not reported as a missing extra."""
    (tmp_path / "broken_pkg_xyz.py").write_text("import missing_inner_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        extras.require("broken_pkg_xyz", "torch")
    assert info.value.name == "missing_inner_dependency_xyz"
