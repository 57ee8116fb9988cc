"""One process of a 2-process training run, for tests/test_faults.py and scripts/fault_drill.py.

`python fault_worker.py PROCESS_ID PORT WORKDIR MODE` joins a 2-process JAX cluster on
127.0.0.1:PORT (gloo CPU collectives, 2 CPU devices per process; heartbeat timeout 10 s) and runs
the real `train` task on a tiny RotNet (digits, 8x8, ResNet width 4) for 6 steps in WORKDIR.
MODE: 'train' (no fault), 'term1' (process 1 sends itself SIGTERM after step 2), 'kill1'
(process 1 SIGKILLs itself after step 2), 'evaluate' (`evaluated_config`: the k-NN monitor during
training and every evaluation protocol after it, streamed and gathered over the 2 processes). Writes WORKDIR/started_<id> once the cluster is up and
prints 'RESULT <id> <final step or stopped>' at the end.
"""
import os
import signal
import sys
import time

import jax

HEARTBEAT_TIMEOUT_S = 10
TOTAL_STEPS = 6


def tiny_config():
    from bow_jax.config import base_config  # pylint: disable=import-outside-toplevel
    c = base_config("rotnet")
    c.model.name = "resnet18"
    c.model.kwargs.width = 4
    c.model.kwargs.cifar_stem = True
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.limit = 256
    c.rotnet.crop_padding = 1
    c.batch_size = 16
    c.num_train_steps = TOTAL_STEPS
    c.steps_per_epoch = 2
    c.log_every = 1
    c.checkpoint_every_steps = 100  # only the stop's and the final checkpoint
    c.eval.after_training = False
    return c


def evaluated_config():
    """`tiny_config` trained with the k-NN monitor every 3 steps and scored after training by
    every protocol: the augmented-image linear probe (in-memory views), few-shot, k-NN."""
    c = tiny_config()
    c.eval.update(dict(after_training=True, every_steps=3, monitor_memory=64, monitor_queries=32,
                       batch_size=16, test_limit=128, linear_protocol="imagenet_r50_obow",
                       linear_epochs=1, linear_batch_size=16, fewshot_episodes=20,
                       fewshot_queries=3, knn_k=5))
    return c


def fault_hook(process_id: int, mode: str):
    def hook(step):
        if step == 2 and process_id == 1:
            if mode == "term1":
                os.kill(os.getpid(), signal.SIGTERM)
            elif mode == "kill1":
                print(f"KILLED 1 at {time.time():.3f}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    return hook


def main(process_id: int, port: int, workdir: str, mode: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    jax.config.update("jax_disable_most_optimizations", True)
    open(os.path.join(workdir, f"started_{process_id}"), "w", encoding="utf-8").close()
    from bow_jax.tasks import train as train_task  # pylint: disable=import-outside-toplevel
    config = evaluated_config() if mode == "evaluate" else tiny_config()
    from bow_jax.lib import stop  # pylint: disable=import-outside-toplevel
    try:
        train_task.run(config, workdir, hooks=[fault_hook(process_id, mode)])
    except stop.Stopped:  # the agreed stop: this process saved the same step as the other
        pass
    from bow_jax.tasks import common  # pylint: disable=import-outside-toplevel
    with common.restore(config, workdir) as run:
        print(f"RESULT {process_id} {run.restored_step}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
