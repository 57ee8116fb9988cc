"""Entry point: python -m bow_jax.main --config=configs/<name>.py --workdir=DIR [--config.x=y].

Kept short on purpose: the logic lives in importable, testable modules.
"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs; "
                  "arguments come from the cluster environment).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax  # pylint: disable=import-outside-toplevel
    if FLAGS.distributed:
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, %d devices: %s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices())
    from bow_jax import tasks  # pylint: disable=import-outside-toplevel
    tasks.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
