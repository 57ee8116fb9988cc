"""The BoWNet chain in one command: RotNet → vocabulary → BoWNet (→ vocabulary → BoWNet ...) → eval.

    python -m bow_jax.main --config=configs/bownet_cifar10_cpu.py --workdir=DIR

with `config.task = 'bownet_chain'`. Every stage has its own folder of DIR:

    DIR/rotnet      RotNet pre-training (config.bownet.rotnet)
    DIR/vocab_1     vocabulary.npz: k-means of the RotNet's dense `teacher_layer` features
    DIR/bownet_1    BoWNet round 1 (the chain's own config), teacher = DIR/rotnet
    DIR/vocab_2     vocabulary of the round-1 student; DIR/bownet_2 its student; ...
                    (config.bownet.rounds rounds)
    DIR/eval        results.json / results.md: every trained stage on the frozen-feature probes
    DIR/chain.json  what the last invocation did: per stage 'ran' or 'reused', and its wall time

Stage configs derive from the chain config: the RotNet stage is `config.bownet.rotnet` (a full
RotNet config); BoWNet rounds are the chain config itself with `bownet.teacher_workdir` and
`bownet.vocabulary` pointed at the previous stages. Every stage shares the chain's `data`, `seed`
and `eval` blocks, so the teacher and the students are trained on, and scored with, the same data.

Streamed training data (TFDS with `config.data.in_memory=False`, ImageNet:
configs/bownet_resnet50_imagenet.py) work in every stage: the training stages cut their views on
the device from streamed canvases; the vocabulary streams the canvases of `vocab_images` random
training images, cuts each one's unperturbed teacher view on the device (the view the BoWNet
targets are computed on: Resize(teacher_resize) + CenterCrop(view_size)) and brings only the
`vocab_max_vectors` kept vectors to the host (`streamed_dense_features`); the evaluation reads
both splits streamed, as the `evaluate` task does, and caches each stage's features (and the
augmented linear probe's checkpoints) in the stage's workdir, where `--config.task=evaluate` on
that stage reuses them.

Re-running the command continues where it stopped: a finished training stage (a checkpoint at its
total step count, written under the same method and model) and an existing vocabulary (built from
the same teacher step, layer, border and K, else an error) are reused, an interrupted training
stage resumes from its last checkpoint, and evaluation results already on disk for the same step
and evaluation settings are read back. A RotNet trained elsewhere with the same config can be
reused by copying its checkpoints folder to DIR/rotnet/checkpoints. Every trained stage is scored
on each feature of `config.bownet.eval_features` (default: `config.eval.feature`).
"""
from __future__ import annotations

import functools
import json
import os
import time
import types
from typing import Callable, Dict, Iterable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bow_jax import pretrain
from bow_jax.bow import build
from bow_jax.data import datasets, eval_input, pipeline
from bow_jax.data.splits import load_split
from bow_jax.protocols import checks, features, runner
from bow_jax.protocols import api as protocols
from bow_jax.lib import checkpoint, errors, files, logs, sharding, stop, writers
from bow_jax.methods import bownet, interface, data_info_for
from bow_jax.models import feature_dims
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task

READS_RUN = False
SECTION = None  # its fields live in config.bownet (rounds, rotnet, vocab_*, eval_features)


def default_config():
    return None

VOCABULARY_FILE = "vocabulary.npz"


# ------------------------------------------------------------------------------------------------
# Stage configs


def _copy(config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def _share_chain_fields(stage, config):
    stage.data = _copy(config.data)
    stage.seed = config.seed
    stage.eval = _copy(config.eval)
    stage.eval.after_training = False  # the chain's evaluation stage scores every network
    stage.task = "train"
    return stage


def rotnet_config(config) -> ml_collections.ConfigDict:
    """The RotNet stage's config: `config.bownet.rotnet` with the chain's data, seed and eval."""
    block = config.bownet.rotnet
    if "method" not in block or block.method != "rotnet":
        raise errors.InputError("config.bownet.rotnet must be a full RotNet config (base_config("
                         "'rotnet'), e.g. loaded with bow_jax.config.get_recipe); got "
                         f"{sorted(block.keys()) or 'an empty block'}.")
    return _share_chain_fields(_copy(block), config)


def bownet_config(config, round_index: int, workdir: str) -> ml_collections.ConfigDict:
    """BoWNet round `round_index` (1-based): the chain config, taught by the previous stage."""
    stage = _share_chain_fields(_copy(config), config)
    stage.bownet.teacher_workdir = stage_dir(workdir, teacher_stage(round_index))
    stage.bownet.vocabulary = os.path.join(stage_dir(workdir, f"vocab_{round_index}"),
                                           VOCABULARY_FILE)
    return stage


def teacher_stage(round_index: int) -> str:
    return "rotnet" if round_index == 1 else f"bownet_{round_index - 1}"


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(os.path.abspath(workdir), name)


# ------------------------------------------------------------------------------------------------
# Training stages


def total_steps(config) -> int:
    return data_info_for(config, load_split(config, "train")).total_steps


def finished_step(config, workdir: str) -> Optional[int]:
    """Latest checkpoint step of the run in `workdir` (None if none); refuses a checkpoint written
    under another method or model."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    ckpt = checkpoint.Checkpointer(directory)
    try:
        step = ckpt.latest_step()
        if step is not None:
            checkpoint.check_same_config(ckpt.read_meta(step)["config"],
                                         checkpoint.config_to_dict(config), f"{directory}/{step}")
        return step
    finally:
        ckpt.close()


def train_stage(config, workdir: str, hooks: Iterable[Callable[[int], None]] = ()) -> str:
    """Trains the stage unless finished; returns 'reused' or 'ran'. A signal's stop.Stopped
    (its step saved) goes up to the chain (`StageRecord.timed` records it)."""
    if (finished_step(config, workdir) or 0) >= total_steps(config):
        return "reused"
    # A diverging stage's advice names the stage (its folder's name) and the fields the user sets.
    train_task.run(config, workdir, hooks=hooks,
                   stage=pretrain.Stage(os.path.basename(workdir), stage_field(config)))
    return "ran"


def stage_field(config) -> str:
    """Where a stage's own settings (optim, model) live in the chain's config, for messages: the
    RotNet stage's in config.bownet.rotnet (`rotnet_config`), a BoWNet round's in the chain's
    config itself (`bownet_config`)."""
    return "config.bownet.rotnet" if config.method == "rotnet" else "config"


# ------------------------------------------------------------------------------------------------
# Vocabulary stage


def dense_teacher_features(config, teacher, variables, images, key, mesh) -> np.ndarray:
    """Per-location vectors of the teacher's `teacher_layer` (eval-mode BN, border skipped) over
    un-augmented uint8 `images`, in equal batches sharded over the mesh: [n, C] numpy.

    Under the `config.bownet.vocab_max_vectors` cap every image contributes the same number of
    locations, drawn uniformly without replacement on the device (keyed by `key` and the batch
    index), so only the kept vectors travel to the host and memory stays O(cap).
    """
    cfg = config.bownet
    mean, std = interface.normalization(config)
    batch = config.eval.batch_size
    sharding.check_divisible(batch, mesh.size, "config.eval.batch_size", "the number of devices")
    shape = feature_dims(teacher, (1,) + images.shape[1:])[cfg.teacher_layer]
    locations = (shape[1] - 2 * cfg.border) * (shape[2] - 2 * cfg.border)
    keep = build.locations_per_image(cfg.vocab_max_vectors, len(images), locations)

    def sample(variables, x, key):
        out = teacher.apply(variables, interface.to_network_input(x, mean, std), train=False)
        return build.keep_locations(key, build.dense_vectors(out[cfg.teacher_layer], cfg.border),
                                    keep)

    kept = features.extract_features(sample, images, batch, mesh, variables=variables, key=key,
                                     progress=f"dense {cfg.teacher_layer} features")
    return kept.reshape(-1, kept.shape[-1])


def vocabulary_positions(key, num_examples: int, vocab_images: int) -> Optional[np.ndarray]:
    """Sorted positions of the vocabulary's images among `num_examples` training images: a
    uniform draw of `vocab_images` without replacement from `key`, or None (all of them) when
    `vocab_images` is 0 or not smaller."""
    if vocab_images and vocab_images < num_examples:
        chosen = jax.random.choice(key, num_examples, (vocab_images,), replace=False)
        return np.sort(np.asarray(chosen))
    return None


def streamed_examples(config, source: datasets.TfdsSource) -> int:
    """How many first examples of the streamed training split the stages train on: all, or
    `config.data.limit` when set."""
    limit = int(config.data.limit or 0)
    return min(limit, source.num_examples) if limit else source.num_examples


def vocabulary_canvases(source: datasets.TfdsSource, count: int,
                        positions: Optional[np.ndarray], local_batch: int):
    """Batches of canvases of the vocabulary's images, in the split's stored order: (uint8
    [local_batch, S, S, 3], true sizes int32 [local_batch, 2], number of real rows); the last
    batch is padded with black S x S images. Streamed by tf.data (`pipeline.record_canvases`,
    as the training batches; an unreadable image named and replaced), decoding only the chosen
    images: one batch alive on the host (plus two prefetched), never the split."""
    builder = source.builder
    split = source.split if count >= source.num_examples else f"{source.split}[:{count}]"
    keep = np.zeros(count, bool)  # the records of the others are read, never decoded
    keep[np.arange(count) if positions is None else positions] = True
    ds = pipeline.subset_records(builder, split, keep)
    ds = pipeline.record_canvases(ds, builder.info.features, source.canvas_size, "image", "label")
    check = pipeline.UnreadableImages(f"{source.name} split {source.split!r}",
                                      source.max_unreadable_fraction)
    side = source.canvas_size
    for batch in pipeline.numpy_batches(ds.batch(local_batch).prefetch(2),
                                        f"{source.name} split {source.split!r}",
                                        builder.data_dir):
        batch = check(batch)
        images, sizes = batch["image"], batch["size"]
        real = len(sizes)
        if real < local_batch:
            images = np.concatenate([images, np.zeros((local_batch - real,) + images.shape[1:],
                                                      np.uint8)])
            sizes = np.concatenate([sizes, np.full((local_batch - real, 2), side, np.int32)])
        yield images, sizes, real


def dense_sampler(config, teacher, view_shape, keep: int, mesh):
    """jit((teacher variables, canvases [B, S, S, 3], sizes [B, 2], key) -> [B, keep, C]): each
    canvas's unperturbed teacher view (`bownet.teacher_view`), the teacher's `teacher_layer`
    (eval-mode BN, border skipped), `keep` locations per image (`build.keep_locations`); batch
    sharded over `mesh`."""
    cfg = config.bownet
    mean, std = interface.normalization(config)
    views = types.SimpleNamespace(cfg=cfg, view_shape=tuple(view_shape))

    def sample(variables, canvases, sizes, key):
        x = jax.vmap(functools.partial(bownet.teacher_view, views))(canvases, sizes)
        out = teacher.apply(variables, interface.to_network_input(x, mean, std), train=False)
        return build.keep_locations(key, build.dense_vectors(out[cfg.teacher_layer], cfg.border),
                                    keep)

    rows, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    return jax.jit(sample, in_shardings=(replicated, rows, rows, replicated), out_shardings=rows)


def streamed_dense_features(config, teacher, variables, source: datasets.TfdsSource,
                            positions: Optional[np.ndarray], count: int, view_shape, key, mesh
                            ) -> tuple[np.ndarray, int, int]:
    """`dense_teacher_features` of streamed images: the teacher's `teacher_layer` vectors
    (eval-mode BN, border skipped) of the unperturbed teacher view of each image
    (`bownet.teacher_view`: Resize(teacher_resize) + CenterCrop(view_size), the view BoWNet's
    targets are computed on), cut on the device from streamed canvases (`vocabulary_canvases`;
    the images at `positions` of the first `count`, or all), in equal batches of
    config.eval.batch_size sharded over the mesh. Under the vocab_max_vectors cap only `keep`
    locations per image, drawn on the device (`build.keep_locations`, keyed by `key` and the
    batch index), travel to the host, into one `build.vector_buffer` of n x keep rows.

    Returns (buffer float32 [rows >= n x keep, C], n x keep vectors filled, keep)."""
    cfg = config.bownet
    batch = config.eval.batch_size
    sharding.check_divisible(batch, mesh.size, "config.eval.batch_size", "the number of devices")
    shape = feature_dims(teacher, (1,) + tuple(view_shape))[cfg.teacher_layer]
    locations = (shape[1] - 2 * cfg.border) * (shape[2] - 2 * cfg.border)
    num_images = count if positions is None else len(positions)
    keep = build.locations_per_image(cfg.vocab_max_vectors, num_images, locations)
    total = num_images * keep
    buffer = build.vector_buffer(total, shape[-1], cfg.num_words, mesh.size)
    logs.say(f"vocabulary: {num_images} streamed images x {keep} of {locations} "
             f"{cfg.teacher_layer} locations = {total} vectors of {shape[-1]} "
             f"({buffer.nbytes / 2 ** 30:.2f} GiB on the host)")
    compiled = dense_sampler(config, teacher, view_shape, keep, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    filled = 0

    def write(out, real):
        nonlocal filled
        kept = np.asarray(out, np.float32)[:real].reshape(-1, buffer.shape[1])
        if filled + len(kept) > total:
            raise errors.InputError(f"{source.name}: the vocabulary pass read more than the "
                                    f"{num_images} images it expected.")
        buffer[filled:filled + len(kept)] = kept
        filled += len(kept)

    batches = vocabulary_canvases(source, count, positions, batch)
    pending = None
    for i, (canvases, sizes, real) in enumerate(writers.progress(
            batches, -(-num_images // batch), f"dense {cfg.teacher_layer} features", "batch")):
        out = compiled(variables, sharding.shard_batch(canvases, mesh),
                       sharding.shard_batch(sizes, mesh), jax.random.fold_in(key, i))
        if pending is not None:  # the device computes batch i while the host copies i - 1
            write(*pending)
        pending = (out, real)
    if pending is not None:
        write(*pending)
    if filled != total:
        raise errors.InputError(f"{source.name} split {source.split!r}: the vocabulary pass "
                                f"read {filled // keep} of the {num_images} images it expected "
                                "(config.data.num_examples?).")
    return buffer, total, keep


def stage_view_shape(config, train_data) -> tuple:
    """(side, side, 3) of the teacher's view the vocabulary and the targets are computed on:
    `bownet.view_shape` (config.bownet.view_size; in-memory data: the stored size)."""
    return bownet.view_shape(config.bownet, getattr(train_data, "image_shape", None))


def build_stage_vocabulary(config, teacher_workdir: str, path: str) -> dict:
    """k-means vocabulary of the frozen teacher in `teacher_workdir` → `path` (npz, atomic).

    In-memory training data: the teacher's dense features of the stored images (a random subset
    of `vocab_images`), `dense_teacher_features`. Streamed data (`config.data.in_memory=False`,
    ImageNet): the same random subset of positions, streamed, each image's unperturbed teacher
    view cut on the device, `streamed_dense_features`; the host holds only the kept vectors
    (vocab_images x keep, bounded by `vocab_max_vectors`), so one of the two must be set.

    Returns the metadata stored beside the centroids: teacher checkpoint and step, layer, border,
    K, number of images and vectors, inertia, iterations.
    """
    if jax.process_count() > 1:
        raise NotImplementedError("The vocabulary stage runs in a single process; build it there "
                                  "and point config.bownet.vocabulary at the file.")
    cfg = config.bownet
    step, teacher_config = bownet.teacher_checkpoint(teacher_workdir, "teacher workdir")
    teacher = bownet.teacher_backbone(teacher_config)
    variables = bownet.load_teacher_variables(teacher_workdir, step)
    train = load_split(config, "train")
    key = jax.random.key(config.seed)
    subset_key, sample_key, kmeans_key = jax.random.split(jax.random.fold_in(key, 7), 3)
    mesh = sharding.make_mesh()
    start = time.time()
    num_vectors, extra = None, {}
    if isinstance(train, datasets.TfdsSource):
        count = streamed_examples(config, train)
        positions = vocabulary_positions(subset_key, count, cfg.vocab_images)
        view = stage_view_shape(config, train)
        x, num_vectors, keep = streamed_dense_features(config, teacher, variables, train,
                                                       positions, count, view, sample_key, mesh)
        num_images = count if positions is None else len(positions)
        extra = {"streamed": True, "view_size": int(view[0]),
                 "teacher_resize": int(cfg.teacher_resize), "locations_per_image": int(keep)}
    else:
        images = train.images
        positions = vocabulary_positions(subset_key, len(images), cfg.vocab_images)
        if positions is not None:
            images = images[positions]
        x = dense_teacher_features(config, teacher, variables, images, sample_key, mesh)
        num_images = len(images)
    features_s = time.time() - start
    centroids, kmeans_meta = build.build_vocabulary(
        kmeans_key, x, cfg.num_words, method=cfg.kmeans_method, n_iter=cfg.kmeans_iters,
        tol=cfg.kmeans_tol, n_init=cfg.kmeans_n_init, mesh=mesh, num_vectors=num_vectors)
    meta = {"teacher_workdir": os.path.abspath(teacher_workdir), "teacher_step": int(step),
            "teacher_model": teacher_config["model"], "layer": cfg.teacher_layer,
            "border": int(cfg.border), "num_images": int(num_images), **kmeans_meta,
            "features_seconds": features_s, **extra}
    build.write_vocabulary(path, centroids, meta)
    logs.say(f"vocabulary: K={cfg.num_words} from {meta['num_vectors']} vectors, mean squared "
             f"distance {meta['mean_sq_distance']:.4g} ({meta['kmeans_iters']} iterations) -> "
             f"{path}")
    return meta


def vocabulary_stage(config, teacher_workdir: str, path: str) -> str:
    """Builds the vocabulary unless a matching one exists; returns 'reused' or 'ran'."""
    if os.path.isfile(path):
        cfg = config.bownet
        step, teacher_config = bownet.teacher_checkpoint(teacher_workdir, "teacher workdir")
        view = stage_view_shape(config, load_split(config, "train"))
        channels = feature_dims(bownet.teacher_backbone(teacher_config),
                                (1,) + tuple(view))[cfg.teacher_layer][-1]
        centroids, meta = build.read_vocabulary(path, "vocabulary file")
        build.check_vocabulary(meta, centroids.shape, teacher_step=step,
                               layer=cfg.teacher_layer, border=cfg.border,
                               num_words=cfg.num_words, channels=channels, path=path)
        built = (meta.get("view_size"), meta.get("teacher_resize"))
        if meta.get("streamed") and built != (view[0], cfg.teacher_resize):
            raise errors.InputError(
                f"{path} was built from teacher views of view_size={built[0]}, teacher_resize="
                f"{built[1]}, but this run has config.bownet.view_size={view[0]}, "
                f"teacher_resize={cfg.teacher_resize}: its words describe other views. Delete "
                f"{os.path.dirname(path)} to rebuild it, or fix the config.")
        return "reused"
    build_stage_vocabulary(config, teacher_workdir, path)
    return "ran"


# ------------------------------------------------------------------------------------------------
# Evaluation stage


def eval_features(config) -> tuple:
    return tuple(config.bownet.eval_features) or (config.eval.feature,)


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _encode(backbone, feature, mean, std, variables, images):
    """Frozen backbone features of one named output (pooled); `variables` = backbone variables."""
    return interface.encode_with(backbone, variables, images, feature, mean, std)


def _encode_state(backbone, feature, mean, std, state, images):
    """The same from a RotNet or BoWNet training state (its 'backbone' sub-tree)."""
    variables = interface.backbone_variables(state)
    return _encode(backbone, feature, mean, std, variables, images)


def eval_settings(config) -> dict:
    """What a score depends on besides the network: the probes and the data they read."""
    ev = {k: v for k, v in config.eval.to_dict().items() if k not in ("after_training", "feature")}
    return json.loads(json.dumps({"eval": ev, "data": config.data.to_dict(), "seed": config.seed},
                                 default=str))


def _reusable(saved: dict, features: Sequence[str], **match) -> dict:
    """The saved results of `features` whose recorded fields equal `match`."""
    return {f: r for f, r in saved.items()
            if f in features and all(r.get(k) == v for k, v in match.items())}


def streamed(config) -> bool:
    """Whether the training split is streamed (TFDS with config.data.in_memory=False, ImageNet):
    then the evaluation stage reads both splits as the `evaluate` task does
    (`eval_input.evaluation_input`: streamed, Resize + CenterCrop where sizes vary) and caches
    each stage's features in its workdir."""
    return config.data.source == "tfds" and not config.data.in_memory


def _feature_config(config, feature: str) -> ml_collections.ConfigDict:
    feature_config = _copy(config)
    feature_config.eval.feature = feature
    return feature_config


def _stage_tag(config, step: int, feature: str) -> str:
    """The cache tag of a streamed stage's scores of `feature`: 'step_<N>' for
    config.eval.feature (the `evaluate` task's), 'step_<N>_<feature>' for the others, so that
    per-tag results (the augmented linear probe's, under eval/linear/<tag>) never mix features."""
    return f"step_{step}" if feature == config.eval.feature else f"step_{step}_{feature}"


def evaluate_stage(config, workdir: str, features: Sequence[str]) -> tuple[dict, str]:
    """Scores the stage's final backbone on each of `features`; results already in
    <workdir>/eval/results.json for the same step and evaluation settings are reused.
    Returns ({feature: result}, 'ran' or 'reused'). Streamed data (`streamed`): both splits
    streamed and the features cached under <workdir>/eval/features (config.eval.cache_features),
    the augmented linear probe checkpointed under <workdir>/eval/linear."""
    path = os.path.join(workdir, "eval", "results.json")
    settings = eval_settings(config)
    have = _reusable(_read_json(path) or {}, features, step=finished_step(config, workdir),
                     settings=settings)
    missing = [f for f in features if f not in have]
    if not missing:
        return have, "reused"
    with common.restore(config, workdir, training=False) as run_:  # scores a finished stage
        train_data, method, mesh, state = run_.train_data, run_.method, run_.mesh, run_.state
    if isinstance(train_data, datasets.TfdsSource):
        train_data = eval_input.evaluation_input(config, "train")
        test_data = eval_input.evaluation_input(config, "test")
        where = workdir if getattr(config.eval, "cache_features", True) else None
    else:
        test_data, where = load_split(config, "test"), None
    backbone = interface.backbone_from_config(config)
    mean, std = interface.normalization(config)
    pretext = None
    for feature in missing:
        # The stage's encoder of `feature`; its pretext task is scored once.
        encoder = protocols.Encoder(
            functools.partial(_encode_state, backbone, feature, mean, std), state)
        extra = {} if where is None else dict(workdir=where,
                                              tag=_stage_tag(config, int(state.step), feature))
        scored = runner.score(encoder, train_data, test_data,
                              config if where is None else _feature_config(config, feature),
                              mesh, pretext_scores=method.pretext_scores if pretext is None
                              else None, **extra)
        pretext = scored["pretext"] if pretext is None else pretext
        have[feature] = {"step": int(state.step), "settings": settings,
                         **scored, "pretext": pretext}
    runner.write_results(workdir, have)
    return {f: have[f] for f in features}, "ran"


def evaluate_random_init(config, workdir: str, features: Sequence[str]) -> dict:
    """The chain's student architecture at random init (seed `config.seed`,
    `runner.score_random_init`), for reference; cached in <workdir>/eval/random_init.json."""
    path = os.path.join(workdir, "eval", "random_init.json")
    settings = eval_settings(config)
    have = _reusable(_read_json(path) or {}, features, settings=settings)
    missing = [f for f in features if f not in have]
    if missing:
        if streamed(config):
            train_data = eval_input.evaluation_input(config, "train")
            test_data = eval_input.evaluation_input(config, "test")
        else:
            train_data, test_data = load_split(config, "train"), load_split(config, "test")
        backbone = interface.backbone_from_config(config)
        mean, std = interface.normalization(config)
        init = runner.backbone_init(backbone, train_data.image_shape)
        mesh = sharding.make_mesh()
        for feature in missing:
            encode = functools.partial(_encode, backbone, feature, mean, std)
            scored = runner.score_random_init(encode, init, train_data, test_data, config, mesh)
            have[feature] = {"settings": settings, **scored}
        if jax.process_index() == 0:
            files.atomic_write_text(path, json.dumps(have, indent=2))
    return {f: have[f] for f in features}


def summarize(results: Dict[str, dict], workdir: str) -> str:
    """DIR/eval/results.{json,md}: one row per (stage, feature)."""
    runner.write_results(workdir, results)
    return runner.markdown_table(results)


# ------------------------------------------------------------------------------------------------
# The chain


class StageRecord:
    """DIR/chain.json: per stage of the last invocation, 'ran' / 'reused' / 'interrupted' and
    its wall time, rewritten (atomically) after every stage."""

    def __init__(self, workdir: str):
        self.workdir, self.stages = workdir, []

    def timed(self, name: str, fn, *args) -> str:
        """`fn(*args)`'s status, recorded with its time; a stage stopped by a signal is recorded
        'interrupted' and its stop.Stopped raised again."""
        start = time.time()
        try:
            status = fn(*args)
        except stop.Stopped:
            self._record(name, "interrupted", time.time() - start)
            raise
        self._record(name, status, time.time() - start)
        return status

    def _record(self, name: str, status: str, seconds: float) -> None:
        self.stages.append({"stage": name, "status": status, "seconds": round(seconds, 1)})
        if jax.process_index() == 0:
            files.atomic_write_text(os.path.join(self.workdir, "chain.json"),
                                    json.dumps({"stages": self.stages}, indent=2))
        logs.say(f"chain stage {name}: {status} in {seconds:.1f} s")


def train_stages(config, workdir: str, record: StageRecord, stage_hooks) -> list:
    """RotNet, then per round its vocabulary and BoWNet: [(stage name, stage config), ...] of
    the trained stages. stop.Stopped when a signal stopped one (its step saved)."""
    stages = [("rotnet", rotnet_config(config))]
    record.timed("rotnet", train_stage, stages[0][1], stage_dir(workdir, "rotnet"),
                 stage_hooks.get("rotnet", ()))
    for r in range(1, config.bownet.rounds + 1):
        stage = bownet_config(config, r, workdir)
        record.timed(f"vocab_{r}", vocabulary_stage, stage, stage.bownet.teacher_workdir,
                     stage.bownet.vocabulary)
        name = f"bownet_{r}"
        record.timed(name, train_stage, stage, stage_dir(workdir, name), stage_hooks.get(name, ()))
        stages.append((name, stage))
    return stages


def evaluate_stages(config, workdir: str, stages: list, results: dict) -> str:
    """Scores every stage (and the random init) on each feature into `results`; returns
    'reused' when every score was read back from disk, else 'ran'."""
    features = eval_features(config)
    statuses = []
    for name, stage in stages:
        scored, status = evaluate_stage(stage, stage_dir(workdir, name), features)
        statuses.append(status)
        label = "rotnet (teacher)" if name == "rotnet" else name
        for feature in features:
            results[f"{label} · {feature}"] = scored[feature]
    if config.eval.random_init:
        for feature, scored in evaluate_random_init(config, workdir, features).items():
            results[f"random init · {feature}"] = scored
    return "reused" if set(statuses) == {"reused"} else "ran"


def check_chain(config) -> None:
    """The BoWNet stages' settings, checked before the RotNet stage trains (InputError naming
    the field): rounds, the views and perturbations, the views' size on streamed data, and a
    vocabulary the streamed data can fill (a bound on the vectors, at least K of them)."""
    cfg = config.bownet
    if cfg.rounds < 1:
        raise errors.InputError(f"config.bownet.rounds={cfg.rounds}; expected >= 1.")
    bownet.check_bownet_config(cfg, training=True)
    if not streamed(config):
        return
    bownet.view_shape(cfg, None)
    if not (cfg.vocab_max_vectors or cfg.vocab_images):
        raise errors.InputError(
            "config.bownet.vocab_max_vectors=0 and vocab_images=0 on streamed data: the "
            "vocabulary would hold every location of every training image on the host; set "
            "the cap (e.g. 2_000_000) or the number of images.")
    if cfg.vocab_max_vectors and cfg.vocab_max_vectors < cfg.num_words:
        raise errors.InputError(f"config.bownet.num_words={cfg.num_words} is more than the "
                                f"config.bownet.vocab_max_vectors={cfg.vocab_max_vectors} "
                                "feature vectors the vocabulary may sample.")


def run(config, workdir: str,
        stage_hooks: Optional[Dict[str, Sequence[Callable[[int], None]]]] = None
        ) -> Optional[dict]:
    """Runs (or resumes) every stage; returns the evaluation results. Raises stop.Stopped when a
    signal stopped a training stage (its step saved; chain.json records it 'interrupted'): run
    the same command again to continue.

    `stage_hooks` maps a stage name ('rotnet', 'bownet_1', ...) to step hooks for its training
    loop (tests use them to interrupt a stage).
    """
    check_chain(config)
    if streamed(config) and config.eval.after_training:
        checks.check_evaluation_data(config)  # fails now, not after days of training
    os.makedirs(workdir, exist_ok=True)
    files.write_config_json(workdir, config)
    record = StageRecord(workdir)
    stages = train_stages(config, workdir, record, stage_hooks or {})
    if not config.eval.after_training:
        return {}
    results = {}
    record.timed("eval", evaluate_stages, config, workdir, stages, results)
    logs.say(f"BoWNet chain results ({config.data.source}):\n{summarize(results, workdir)}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bownet_chain done")
    return results
