"""The tiny OBoW setting shared by tests/test_obow.py, and the multi-process worker it starts.

As a script: `python obow_multihost_worker.py PROCESS_ID PORT OUTDIR` joins a 2-process JAX
cluster on 127.0.0.1:PORT (gloo CPU collectives, 2 CPU devices per process), runs one OBoW step
on the global batch in OUTDIR/views.npz (each process feeds its contiguous half) and writes the
resulting state, as seen by this process, to OUTDIR/state_<PROCESS_ID>.npz.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.config import base_config

TOTAL_STEPS = 20
STEP = 9  # the step the prepared state is at: mid-run teacher momentum, cosine lr past warm-up


def tiny_config(fast: bool = False, photometric: bool = False):
    """ResNet-10 of width 4 on 16x16 digits, two BoW levels, K = 2 x batch.

    Without `photometric` (colour jitter, grayscale, blur, flips: checked on their own) the
    network inputs are the normalised views, so numpy can rebuild them; `fast`: also no patch
    group (fewer ops to compile).
    """
    c = base_config("obow")
    c.model.name = "resnet18"
    c.model.kwargs.width = 4
    c.model.kwargs.cifar_stem = True
    c.model.kwargs.stage_sizes = (1, 1, 1, 1)
    c.data.source = "digits"
    c.data.image_size = 16
    c.data.limit = 256
    c.batch_size = 16
    c.num_train_steps = TOTAL_STEPS
    c.steps_per_epoch = 4
    c.optim.lr = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1
    c.log_every = 1
    c.eval.after_training = False
    o = c.obow
    o.bow_levels = ("layer2", "layer3")  # 12x12 and 6x6 for the 24x24 teacher
    o.num_words = 32
    o.inv_delta = 10.0
    o.kappa = 5.0
    o.teacher_size = 24
    o.teacher_resize = 0
    o.crop_size = 12
    o.patch_size = 8
    o.patch_source_size = 16
    o.patch_jitter = 2
    if not photometric:
        o.color_jitter_p = o.grayscale_p = o.blur_p = 0.0
        o.flip = False
    if fast:
        o.num_patches = 0
    return c


def random_views(config, seed: int = 7) -> dict:
    """A global batch of uint8 views with the config's shapes (the step does not care where
    views come from; make_views is tested apart)."""
    o, b = config.obow, config.batch_size
    rng = np.random.default_rng(seed)
    shapes = {"teacher": (b, o.teacher_size, o.teacher_size, 3),
              "crops": (b, o.num_crops, o.crop_size, o.crop_size, 3),
              "patches": (b, o.num_patches, o.patch_size, o.patch_size, 3)}
    return {k: rng.integers(0, 256, v, dtype=np.uint8) for k, v in shapes.items()}


def prepared_state(method, config):
    """The initial state moved to a point where every part of the step shows: step STEP, a teacher
    that differs from the student, queue pointers at K - B (the write wraps), distinct statistics."""
    def prepare():
        state = method.init_state(jax.random.key(config.seed))
        noise = jax.tree.map(
            lambda x: 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
            state.teacher_params)
        ptr = config.obow.num_words - config.batch_size
        return state.replace(
            step=jnp.int32(STEP),
            teacher_params=jax.tree.map(jnp.add, state.teacher_params, noise),
            pointers=tuple(jnp.int32(ptr) for _ in state.pointers),
            mean_min_dist=tuple(jnp.float32(v) for v in (2.0, 0.3)[:len(state.pointers)]))
    return prepare


def flat_state(state) -> dict:
    """{path: numpy array} of every state leaf but the (never changing) RNG key."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue
        if isinstance(x, jax.Array):
            x = x.addressable_data(0)
        out[jax.tree_util.keystr(path)] = np.asarray(x)
    return out


def main(process_id: int, port: int, outdir: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A peer that never joins is an error after 120 s (the test's own limit is 240 s).
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    open(os.path.join(outdir, f"started_{process_id}"), "w").close()
    jax.config.update("jax_disable_most_optimizations", True)
    from bow_jax.data.splits import load_split  # pylint: disable=import-outside-toplevel
    from bow_jax.lib import sharding  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import create_method, data_info_for  # pylint: disable=C0415

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    config = tiny_config()
    method = create_method(config, data_info_for(config, load_split(config, "train")))
    mesh = sharding.make_mesh()
    state = jax.jit(prepared_state(method, config), out_shardings=sharding.replicated(mesh))()
    views = dict(np.load(os.path.join(outdir, "views.npz")))
    local = config.batch_size // 2
    batch = {k: v[process_id * local:(process_id + 1) * local] for k, v in views.items()}
    state, _ = jax.jit(method.train_step)(state, sharding.shard_batch(batch, mesh))
    np.savez(os.path.join(outdir, f"state_{process_id}.npz"), **flat_state(state))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
