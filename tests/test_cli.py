"""The command line: `python3 -m bow_jax.main` mistakes are one line and exit status 2, and
`--list_config` lists the fields. Nothing here trains: configs are only parsed.

The subprocess tests run the real entry point (a few seconds each, mostly importing JAX); the
diagnosis itself (lib/cli.py) is also tested in-process.
"""
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from bow_jax.lib import checkpoint, cli, errors, lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "configs/demo.py"


def _main(*args, timeout=300):
    """Runs the entry point from the repository root; returns (status, stdout, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "bow_jax.main", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout, check=False)
    return result.returncode, result.stdout, result.stderr


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.optim = ml_collections.ConfigDict({"lr": 0.1, "momentum": 0.9})
    c.eval = ml_collections.ConfigDict({"fewshot_shots": (1, 5), "knn": {"k": 20}})
    c.model = ml_collections.ConfigDict({"kwargs": ml_collections.ConfigDict()})
    c.lock()
    return c


# ---- through the entry point ----------------------------------------------------------------

def test_unknown_override_is_one_line_with_the_dotted_key_and_a_suggestion(tmp_path):
    status, out, err = _main(f"--config={DEMO}", "--config.optim.lrr=0.1",
                             f"--workdir={tmp_path}")
    assert status == 2
    assert err == ("error: --config.optim.lrr: config.optim has no field 'lrr'; "
                   "did you mean config.optim.lr?\n")
    assert out == "" and not os.listdir(tmp_path)


def test_a_tuple_override_of_the_wrong_kind_is_one_line_before_any_work(tmp_path):
    """A fresh user's attack: '(abc)', '(1.5,5)' (shots) or unquoted names became one string
    element or floats that failed after training (few-shot) or were truncated (checkpoint
    steps). Now one line naming the flag and an example, exit 2, nothing created."""
    status, out, err = _main(f"--config={DEMO}", "--config.eval.fewshot_shots=(1.5,5)",
                             f"--workdir={tmp_path / 'run'}")
    assert status == 2 and out == "" and not os.listdir(tmp_path)
    assert err == ("error: --config.eval.fewshot_shots=(1.5, 5): expected a tuple of integers, "
                   "e.g. --config.eval.fewshot_shots='(1,5)'\n")


@pytest.mark.parametrize("path, default, value, expected", [
    ("eval.fewshot_shots", (1, 5), ("(abc)",), "fewshot_shots=(abc): expected a tuple of integers"),
    ("eval.fewshot_shots", (1, 5), (1, 5, 10), None),
    ("eval.checkpoint_steps", (), (3.9,), "expected a tuple of integers, e.g. "),
    ("optim.milestones", (), (30, 60), None),
    ("obow.crop_scale", (0.08, 0.6), ("(nan,1)",), "expected a tuple of numbers, e.g. "
                                                    "--config.obow.crop_scale='(0.08,0.6)'"),
    ("obow.crop_scale", (0.08, 0.6), (0.2, 1), None),
    ("obow.bow_levels", ("layer3",), ("(layer3,layer4)",),
     "read as one string; quote each, e.g. \"--config.obow.bow_levels=('layer3','layer4')\""),
    ("obow.bow_levels", ("layer3",), ("layer3", "layer4"), None),
    ("model.something", (), ("x",), None),  # unknown element kind: left to the method's checks
])
def test_tuple_mistake(path, default, value, expected):
    got = cli.tuple_mistake(path, default, value)
    assert (got is None) if expected is None else (expected in got), got


def test_an_unusable_workdir_is_a_write_error_naming_it(tmp_path):
    """A file where the workdir should be (and a read-only folder) is an explained error naming
    --workdir, not a FileExistsError traceback."""
    path = tmp_path / "afile"
    path.write_text("")
    with pytest.raises(errors.WriteError, match=r"--workdir=.*afile: cannot be created"):
        with lock.WorkdirLock(str(path)):
            pass
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.access(readonly, os.W_OK):  # root ignores the mode bits: a file system can't be tried
        return
    with pytest.raises(errors.WriteError, match="cannot write its lock file"):
        with lock.WorkdirLock(str(readonly)):
            pass


def test_list_config_prints_every_field_with_overrides_and_needs_no_workdir():
    status, out, err = _main(f"--config={DEMO}", "--list_config", "--config.optim.lr=0.3")
    assert status == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["config.optim.lr"] == ["0.3", "float"]
    assert rows["config.method"] == ["'obow'", "str"]  # the demo trains OBoW
    assert rows["config.batch_size"] == ["32", "int"]  # the demo's value, not the base one
    assert all(name.startswith("config.") for name in rows)
    assert "Traceback" not in err


def test_config_file_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    status, _, err = _main(f"--config={bad}", f"--workdir={tmp_path}")
    assert (status, err) == (2, f"error: --config={bad}: line 1: SyntaxError: invalid syntax\n")
    status, _, err = _main("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
    assert status == 2 and err.startswith("error: --config=configs/no_such_config.py: no such file")
    assert err.count("\n") == 1


def test_workdir_is_required_without_list_config():
    status, out, err = _main(f"--config={DEMO}")
    assert status == 2 and out == ""
    assert err.startswith("error: --workdir is required") and err.count("\n") == 1


def test_importing_main_leaves_jax_uninitialised_for_distributed():
    """--distributed calls jax.distributed.initialize(), which must come before any backend."""
    code = textwrap.dedent("""
        import sys
        import bow_jax.main
        from jax._src import xla_bridge
        assert not xla_bridge.backends_are_initialized()
        assert "tensorflow" not in sys.modules and "torch" not in sys.modules, "heavy imports"
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr


# ---- lib/cli.py in-process ----------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("optim.lr", None),
    ("eval.fewshot_shots[0]", None),
    ("optim.lrr", "config.optim has no field 'lrr'; did you mean config.optim.lr?"),
    ("optimm.lr", "config has no field 'optimm'; did you mean config.optim?"),
    ("lr", "config has no field 'lr'; did you mean config.optim.lr?"),
    ("k", "config has no field 'k'; did you mean config.eval.knn.k?"),
    ("eval.knn.kk", "config.eval.knn has no field 'kk'; did you mean config.eval.knn.k?"),
    ("optim.zzz", "config.optim has no field 'zzz'; config.optim's fields are listed by "
                  "--list_config"),
    ("optim.lr.x", "config.optim.lr is a float, not a section with field 'x'"),
])
def test_unknown_field(path, message):
    assert cli.unknown_field(_config(), path) == message


def test_override_paths_and_config_argument():
    argv = ["--config", "c.py:arg", "--config.a.b=1", "--noconfig.flag", "-config.x", "2",
            "--workdir=w", "--configs.y=1"]
    assert cli.config_argument(argv) == "c.py:arg"
    assert cli.config_argument(["--config=d.py"]) == "d.py"
    assert cli.override_paths(argv) == ["a.b", "flag", "x"]


def test_load_config_file_reports_the_line_of_an_exception(tmp_path):
    path = tmp_path / "raises.py"
    path.write_text("def get_config(size='1'):\n    x = 1\n    return {}[size]\n")
    with pytest.raises(cli.CommandLineError) as info:
        cli.load_config_file(f"{path}:small")
    assert str(info.value) == f"--config={path}:small: line 3: KeyError: 'small'"
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert cli.diagnose([f"--config={tmp_path / 'empty.py'}"]) == \
        f"--config={tmp_path / 'empty.py'}: the file defines no get_config() function"


def test_diagnose_finds_the_first_unknown_override(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'optim': {'lr': 0.1}})\n")
    argv = [f"--config={path}", "--config.optim.lr=1", "--config.optim.momentun=0.9"]
    assert cli.diagnose(argv) == ("--config.optim.momentun: config.optim has no field "
                                  "'momentun'; config.optim's fields are listed by --list_config")
    assert cli.diagnose(argv[:2]) is None


def test_fields_lists_leaves_with_types():
    rows = cli.fields(_config())
    assert ("config.optim.lr", 0.1, "float") in rows
    assert ("config.eval.fewshot_shots", (1, 5), "tuple") in rows
    assert ("config.eval.knn.k", 20, "int") in rows
    assert ("config.model.kwargs", {}, "ConfigDict") in rows  # an empty section still shows
    lines = cli.format_fields(_config()).splitlines()
    assert len(lines) == len(rows)
    assert lines[0].split() == ["config.eval.fewshot_shots", "(1,", "5)", "tuple"]


@pytest.mark.parametrize("error, expected", [
    (errors.InputError("config.data.path must be set for source 'npz'."), True),
    (errors.MissingInputError("--workdir=/x: no checkpoint in /x/checkpoints"), True),
    (errors.WriteError("Checkpoint /w/8 could not be written: No space left on device."), True),
    (checkpoint.NonFiniteError("Step 4: NaN"), True),
    (checkpoint.CorruptCheckpointError("No intact checkpoint in /w"), True),
    (lock.WorkdirLockedError("--workdir=x is in use"), True),
    (ImportError("torch is not installed; install it with: pip install 'bow_jax[torch]'"), True),
    # Decided by the type, not the wording: a builtin error that names a field is still a bug
    # (its raise site must use errors.InputError to be shown without a traceback).
    (ValueError("config.data.path must be set for source 'npz'."), False),
    (FileNotFoundError("--workdir=/x: no checkpoint in /x/checkpoints"), False),
    (ValueError("operands could not be broadcast together"), False),
    (ImportError("cannot import name 'x' from 'y'"), False),
    (KeyError("config.x"), False),
])
def test_is_input_error(error, expected):
    assert cli.is_input_error(error) is expected


def test_whole_message_keeps_every_line():
    error = errors.InputError("3 of 12 files cannot be decoded:\n  /d/a.jpg\n  /d/b.jpg\n")
    assert cli.whole_message(error) == "3 of 12 files cannot be decoded:\n  /d/a.jpg\n  /d/b.jpg"
    assert cli.whole_message(errors.InputError()) == "InputError()"


def test_a_planned_stop_of_a_probe_or_fine_tuning_exits_0_with_one_line(tmp_path):
    """SIGTERM during the augmented linear probe or fine-tuning saves the step and raises a
    `stop.Stopped`: like a training run stopped by a signal, the command exits 0 (a scheduler
    that requeues on preemption reruns it, and it resumes), printing the message, no traceback."""
    code = (
        "import sys\n"
        "from absl import app\n"
        "from bow_jax import main\n"
        "from bow_jax.lib import stop\n"
        "def stopped(config, workdir):\n"
        "    raise stop.Stopped('linear probe step_4 stopped by a signal at step 5/12, saved in X; "
        "the same command resumes it.')\n"
        "main.tasks.run = stopped\n"
        f"sys.argv = ['bow_jax.main', '--config=configs/demo.py', '--workdir={tmp_path}']\n"
        "app.run(main.main, flags_parser=main.parse_flags)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped by a signal at step 5/12" in result.stderr
    assert "Traceback" not in result.stderr and "bow_jax: done" not in result.stderr
