"""Entry point: python -m bow_jax.main --config=configs/<name>.py --workdir=DIR [--config.x=y].

  --list_config        print every field of the config (dotted name, value, type) and exit
  --verbosity=0 / -v 0 show the libraries' INFO logging (Orbax, JAX), off by default
  --distributed        call jax.distributed.initialize() first (multi-host runs)

Kept short on purpose: the work is in `bow_jax.tasks` (one module per `config.task`), the
command-line diagnosis in `bow_jax.lib.cli`, the logging set-up in `bow_jax.lib.logs`.
A command-line mistake is one line on stderr, `error: ...`, and exit status 2. A fault the run
explains (`lib/errors.ExplainedError`: bad input, a failed write, a damaged checkpoint, ...) is
`error: <its whole message>` and exit status 1, no traceback unless --verbosity=0.
"""
import os
import sys
from typing import List, NoReturn

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from bow_jax import tasks
from bow_jax.lib import cli, logs, stop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs; "
                  "arguments come from the cluster environment).")
flags.DEFINE_integer("heartbeat_timeout_s", 100, "With --distributed: seconds without a "
                     "heartbeat before a lost process fails the whole run (no hang).")
flags.DEFINE_bool("list_config", False, "Print every field of --config (dotted name, value, "
                  "type), overrides applied, and exit; needs no --workdir.")

USAGE_ERROR = 2  # exit status of a command-line mistake, as argparse and absl use


def _exit_with(message: str, status: int = USAGE_ERROR) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv: List[str]) -> List[str]:
    """absl's flag parsing, each mistake reported as one line (no usage text, no traceback).

    config_flags raises while parsing for a config override it cannot apply, and loads a missing
    --config file lazily (an error object until first use): both are diagnosed here, by
    `cli.diagnose`, in terms of the command line.
    """
    try:
        rest = FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # all of them are the user's input
        _exit_with(cli.diagnose(argv[1:]) or cli.first_line(e))
    if FLAGS["config"].value is None:
        _exit_with("--config is required: a config file, e.g. --config=configs/demo.py")
    if not isinstance(FLAGS.config, ml_collections.ConfigDict):
        _exit_with(cli.diagnose(argv[1:]) or f"--config={cli.config_argument(argv[1:])}: "
                   "get_config() did not return a ConfigDict")
    problem = cli.check_overrides(argv[1:], FLAGS.config)
    if problem:
        _exit_with(problem)
    if not FLAGS.workdir and not FLAGS.list_config:
        _exit_with("--workdir is required (where checkpoints, metrics and results go); only "
                   "--list_config runs without it")
    if len(rest) > 1:
        _exit_with(f"unexpected argument(s) {' '.join(rest[1:])}; flags take the form --name=value")
    return rest


def main(argv: List[str]) -> None:
    del argv  # checked by parse_flags
    if FLAGS.list_config:
        print(cli.format_fields(FLAGS.config), flush=True)
        return
    logs.setup(FLAGS.verbosity if FLAGS["verbosity"].present else None)
    if FLAGS.distributed:
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)
    config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
    logs.say(f"bow_jax: task {config.get('task')}, method {config.get('method')}; "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s) in "
             f"{jax.process_count()} process(es); workdir {workdir}")
    try:
        with stop.signals_stop_at_once(f"the {config.get('task')} task"):
            tasks.run(config, workdir)
    except stop.Stopped as e:  # a planned stop (checkpoint saved): exit 0, as training does
        logs.warn(cli.first_line(e))
        return
    except Exception as e:  # pylint: disable=broad-except
        if not cli.is_input_error(e) or not logs.is_quiet():
            raise  # a bug, or --verbosity=0: the traceback
        _exit_with(cli.whole_message(e), status=1)  # every line: a list of files is the point
    outputs = ", ".join(sorted(os.listdir(workdir))) if os.path.isdir(workdir) else "nothing"
    logs.say(f"bow_jax: done; outputs in {workdir}: {outputs}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
