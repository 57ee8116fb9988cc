"""The augmented linear probe (`evaluate.augmented_linear`, OBoW's ImageNet ResNet-50 protocol):
its schedule and SGD step against torch, an interrupted and resumed probe equal to an
uninterrupted one, the TFDS path end to end with (seed, step)-deterministic views, and the
runner using it for linear_protocol='imagenet_r50_obow'."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax import tasks
from bow_jax.data import batches as batch_source
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import augmented_linear as AL
from bow_jax.protocols import checks, linear, runner
from bow_jax.lib import sharding, stop, writers
from bow_jax.tasks import common

torch = pytest.importorskip("torch")

SIDE, DIM, CLASSES = 12, 6, 3


def _toy(side=SIDE, dim=DIM, seed=13):
    """encode(variables, uint8 images) = pixels / 255 @ variables['proj']: a frozen 'backbone'
    whose features numpy can rebuild."""
    proj = np.random.default_rng(seed).normal(size=(side * side * 3, dim)) / side
    proj = proj.astype(np.float32)

    def encode(variables, images):
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        return x @ variables["proj"]

    return encode, {"proj": jnp.asarray(proj)}, proj


def _arrays(n, seed, side=SIDE):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % CLASSES).astype(np.int32)
    # Class-dependent brightness, so the probe has something to learn.
    images = rng.integers(0, 120, (n, side, side, 3)) + 60 * labels[:, None, None, None]
    return datasets.ArrayDataset(images.astype(np.uint8), labels, CLASSES, f"toy{seed}")


def _protocol(**overrides):
    p = dict(linear.PROTOCOLS["imagenet_r50_obow"])
    p.update(overrides)
    return p


# ------------------------------------------------------------------------- (a) schedule and step

def test_learning_rate_per_epoch_matches_torch_schedulers():
    """Per step: the lr of its epoch; torch CosineAnnealingLR(T_max=epochs) and MultiStepLR,
    stepped once per epoch, as OBoW's solver does."""
    steps_per_epoch, epochs = 3, 5
    for protocol, make in (
            (_protocol(epochs=epochs),
             lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)),
            (_protocol(epochs=epochs, lr=0.5, schedule="step", milestones=(2, 4),
                       decay_factor=0.1),
             lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], 0.1))):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=protocol["lr"])
        sched, want = make(opt), []
        for _ in range(epochs):
            want += [opt.param_groups[0]["lr"]] * steps_per_epoch
            opt.step()
            sched.step()
        got = [AL.step_learning_rate(s, steps_per_epoch, protocol)
               for s in range(epochs * steps_per_epoch)]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert AL.step_learning_rate(0, 3, _protocol()) == 10.0


def test_sharded_step_matches_torch_linear_sgd():
    """Two jitted steps over the 8-device mesh (frozen toy backbone, head update, donated state)
    equal torch.nn.Linear + SGD(momentum 0.9, weight decay) + cross-entropy on the same
    features, with the learning rate changed between the steps."""
    encode, variables, proj = _toy()
    protocol = _protocol(lr=0.5, weight_decay=1e-3)
    mesh = sharding.make_mesh()
    state = sharding.replicate(AL.init_head(CLASSES, DIM, protocol, seed=0), mesh)
    kernel = np.asarray(state.variables["params"]["fc"]["kernel"])
    assert 0.003 < kernel.std() < 0.03 and not state.variables["params"]["fc"]["bias"].any()

    fc = torch.nn.Linear(DIM, CLASSES).double()
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(kernel.T.astype(np.float64)))
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    step = AL.compile_train_step(encode, CLASSES, protocol, mesh)
    data = _arrays(16, 1)
    for lr, rows in ((0.5, slice(0, 8)), (0.25, slice(8, 16))):
        images, labels = data.images[rows], data.labels[rows]
        batch = sharding.shard_batch({"image": images, "label": labels}, mesh)
        state, metrics = step(state, variables, batch, jnp.float32(lr))
        feats = images.reshape(8, -1).astype(np.float64) / 255.0 @ proj.astype(np.float64)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fc(torch.from_numpy(feats)),
                                                 torch.from_numpy(labels).long())
        loss.backward()
        opt.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4)
    params = state.variables["params"]["fc"]
    np.testing.assert_allclose(params["kernel"], fc.weight.detach().numpy().T, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(params["bias"], fc.bias.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert int(state.step) == 2


def test_device_views_are_keyed_crops_and_flips():
    """In-memory views: uint8 crops of the asked side, a function of the key only; with scale
    (1, 1) and a square image the crop is the whole image, so each view is it or its mirror. The
    same images in the corners of larger canvases (streamed data) give the same views."""
    data = _arrays(8, 2)
    key = jax.random.key(4)
    sizes = jnp.full((8, 2), SIDE, jnp.int32)  # in-memory images are their own canvases
    views = jax.jit(lambda x, s, k, crop, scale: batch_source.crop_flip_views(
        x, s, k, crop=crop, scale=scale), static_argnums=(3, 4))
    a = views(data.images, sizes, key, 8, AL.SCALE)
    b = views(data.images, sizes, key, 8, AL.SCALE)
    assert a["image"].shape == (8, 8, 8, 3) and a["image"].dtype == jnp.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    canvases = np.full((8, SIDE + 5, SIDE + 5, 3), 255, np.uint8)
    canvases[:, :SIDE, :SIDE] = data.images
    np.testing.assert_array_equal(views(canvases, sizes, key, 8, AL.SCALE)["image"], a["image"])
    whole = views(data.images, sizes, key, SIDE, (1.0, 1.0))["image"]
    flipped = [np.array_equal(v, x[:, ::-1]) for v, x in zip(np.asarray(whole), data.images)]
    same = [np.array_equal(v, x) for v, x in zip(np.asarray(whole), data.images)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


# ------------------------------------------------------------------------------------- (b) resume

class Stop(Exception):
    pass


def _run(n=48, epochs=2, batch=8):
    return AL.probe_run(_protocol(epochs=epochs, batch_size=batch, lr=0.5), CLASSES, n,
                        crop=SIDE, seed=3)


def test_resumed_probe_equals_uninterrupted(tmp_path):
    """Stopped after step 5 (checkpoints every 4 steps: step 5 is lost), restarted: the head
    resumes at step 4 and ends with the same weights, bit for bit, as a run straight through;
    stopped by a SIGTERM, step 5 is saved and the rerun resumes at 5, with the same end."""
    encode, variables, _ = _toy()
    data, run = _arrays(48, 5), _run()
    assert run.steps_per_epoch == 6 and run.total_steps == 12
    through = AL.train_head(encode, variables, data, 48, run,
                            checkpoint_dir=str(tmp_path / "a" / "checkpoints"), checkpoint_every=4)
    # The driver's metric rows: one per epoch, in the probe's folder, the lr set per epoch.
    rows = writers.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [6, 12] and rows[1]["lr"] < rows[0]["lr"]
    assert {"loss", "top1", "lr"} <= set(rows[0])

    def stop_at_5(done):
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        AL.train_head(encode, variables, data, 48, run, checkpoint_dir=str(tmp_path / "b"),
                      checkpoint_every=4, hooks=[stop_at_5])
    seen = []
    resumed = AL.train_head(encode, variables, data, 48, run,
                            checkpoint_dir=str(tmp_path / "b"), checkpoint_every=4,
                            hooks=[seen.append])
    assert seen == list(range(5, 13))
    jax.tree.map(np.testing.assert_array_equal, resumed, through)
    # A SIGTERM after step 5: step 5 is saved (off the every-4 grid) and the rerun resumes there.
    def sigterm_at_5(done):
        if done == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 5/12, saved in .*same command resumes"):
        AL.train_head(encode, variables, data, 48, run, checkpoint_dir=str(tmp_path / "c"),
                      checkpoint_every=4, hooks=[sigterm_at_5])
    assert sorted(os.listdir(tmp_path / "c")) == ["4", "5"]
    seen.clear()
    resumed = AL.train_head(encode, variables, data, 48, run,
                            checkpoint_dir=str(tmp_path / "c"), checkpoint_every=4,
                            hooks=[seen.append])
    assert seen == list(range(6, 13))
    jax.tree.map(np.testing.assert_array_equal, resumed, through)
    init = AL.init_head(CLASSES, DIM, run.protocol, run.seed).variables
    assert not np.allclose(init["params"]["fc"]["kernel"], through["params"]["fc"]["kernel"])
    # Checkpoints of another setting are refused, naming what differs.
    other = AL.probe_run(_protocol(epochs=3, batch_size=8, lr=0.5), CLASSES, 48, crop=SIDE, seed=3)
    with pytest.raises(ValueError, match="epochs"):
        AL.train_head(encode, variables, data, 48, other, checkpoint_dir=str(tmp_path / "b"))


def test_probe_resumes_and_its_result_is_reused(tmp_path, monkeypatch):
    """`augmented_linear_probe` with a workdir: an interrupted probe, rerun, gives the test
    accuracy of an uninterrupted one; its result.json is then read back without training."""
    encode, variables, _ = _toy()
    train = runner.as_input(_arrays(48, 6), "train")
    test = _arrays(30, 7)
    feats = np.asarray(encode(variables, test.images))
    kwargs = dict(protocol=_protocol(epochs=2, batch_size=8, lr=0.5), seed=1, crop=SIDE,
                  checkpoint_every=4, tag="step_0")
    want = AL.augmented_linear_probe(encode, variables, train, feats, test.labels,
                                     workdir=str(tmp_path / "a"), **kwargs)
    assert set(want) == {"top1"} and want["top1"] > 1 / CLASSES

    def stop(done):
        if done == 6:
            raise Stop

    with pytest.raises(Stop):
        AL.augmented_linear_probe(encode, variables, train, feats, test.labels,
                                  workdir=str(tmp_path / "b"), hooks=[stop], **kwargs)
    folder = tmp_path / "b" / "eval" / "linear" / "step_0"
    assert sorted(os.listdir(folder / "checkpoints")) == ["4"]
    got = AL.augmented_linear_probe(encode, variables, train, feats, test.labels,
                                    workdir=str(tmp_path / "b"), **kwargs)
    assert got == want
    saved = json.loads((folder / "result.json").read_text())
    assert saved["result"] == want and saved["settings"]["batch_size"] == 8
    monkeypatch.setattr(AL, "train_head", lambda *a, **k: pytest.fail("trained again"))
    assert AL.augmented_linear_probe(encode, variables, train, feats, test.labels,
                                     workdir=str(tmp_path / "b"), **kwargs) == want


def test_unsupported_source_and_bad_batch_are_named(tmp_path):
    listing = eval_input.ImageFolderInput("folder", "train", 4, 2, eval_input.Transform())
    with pytest.raises(AL.UnsupportedSourceError, match="ImageFolderInput"):
        AL.training_data(listing)
    with pytest.raises(ValueError, match="linear_batch_size"):
        AL.probe_run(_protocol(batch_size=64), CLASSES, 48, crop=8, seed=0)
    import obow_multihost_worker  # tests/ is on sys.path: the tiny OBoW setting
    c = obow_multihost_worker.tiny_config(fast=True)
    c.eval.update(dict(linear_protocol="imagenet_r50_obow", linear_batch_size=12))
    with pytest.raises(ValueError, match="linear_batch_size"):
        checks.check_evaluation_data(c)  # 12 does not divide over the 8 devices


# ----------------------------------------------------------------------------------------- (c) TFDS

N_TRAIN = 24


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A prepared TFDS dataset of images of several sizes (as ImageNet), built offline."""
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(4)

    def split(n):
        images = [rng.integers(0, 256, tuple(rng.integers(17, 24, 2)) + (3,), dtype=np.uint8)
                  for _ in range(n)]

        def gen():
            for i, image in enumerate(images):
                yield {"image": image, "label": i % CLASSES}
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "label": tf.TensorSpec((), tf.int64)})

    feats = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                        "label": tfds.features.ClassLabel(num_classes=CLASSES)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_probe", version="1.0.0", features=feats, data_dir=str(data_dir),
        split_datasets={"train": split(N_TRAIN), "test": split(12)})
    return str(data_dir)


def _tfds_config(data_dir, **evals):
    from bow_jax.config import base_config
    c = base_config("rotnet")
    c.data.update(dict(source="tfds", name="tiny_probe", data_dir=data_dir, in_memory=False))
    c.eval.update(dict(image_size=8, resize_shorter=10, **evals))
    return c


def test_tfds_views_are_deterministic_per_seed_and_step(tiny_tfds):
    train = eval_input.evaluation_input(_tfds_config(tiny_tfds, train_limit=16), "train")
    data, n = AL.training_data(train)
    assert isinstance(data, datasets.TfdsSource) and n == 16
    mesh = sharding.make_mesh()

    def batches(start, count, seed=0):
        it = AL.probe_batches(data, n, batch_size=8, crop=8, seed=seed, mesh=mesh,
                              start_step=start)
        return [jax.tree.map(np.asarray, next(it)) for _ in range(count)]

    full = batches(0, 4)  # 2 steps per epoch (16 of the 24 images): two epochs
    assert full[0]["image"].shape == (8, 8, 8, 3) and full[0]["image"].dtype == np.uint8
    for a, b in zip(batches(1, 3), full[1:]):  # resumed mid-epoch and across an epoch
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(full[0]["image"], full[2]["image"])  # epochs differ
    assert not np.array_equal(batches(0, 1, seed=1)[0]["image"], full[0]["image"])
    # An epoch reads the first 16 examples of the split (train_limit), each once.
    tfds = pytest.importorskip("tensorflow_datasets")
    first = [int(x["label"]) for x in tfds.as_numpy(
        data.builder.as_dataset(split="train[:16]", shuffle_files=False))]
    for epoch in (full[:2], full[2:]):
        assert sorted(np.concatenate([b["label"] for b in epoch])) == sorted(first)


def test_tfds_probe_end_to_end(tiny_tfds, tmp_path):
    """Streamed TFDS training split (images of several sizes, as canvases), RandomResizedCrop(8) +
    flip and a toy backbone on the device; test features of the centre crops."""
    encode, variables, _ = _toy(side=8)
    config = _tfds_config(tiny_tfds)
    train = eval_input.evaluation_input(config, "train")
    test = eval_input.evaluation_input(config, "test")
    from bow_jax.protocols import cache
    test_x = cache.split_features(encode, test, 8, variables=variables)
    train_x = cache.split_features(encode, train, 8, variables=variables)
    protocol = _protocol(epochs=2, batch_size=8)
    out = AL.probe_for_score(config, encode, variables, train, train_x, test_x, protocol,
                             workdir=str(tmp_path), tag="t")
    assert set(out) == {"top1", "train_top1"} and 0 <= out["top1"] <= 1
    assert sorted(os.listdir(tmp_path / "eval" / "linear" / "t" / "checkpoints")) == ["6"]


# ------------------------------------------------------------------------------------ (d) runner

def test_evaluate_task_uses_the_augmented_probe(tmp_path, monkeypatch):
    """linear_protocol='imagenet_r50_obow' with tiny batch / epochs: the evaluate task trains the
    head on augmented digits (in memory, on the device) and writes result['linear']['top1']."""
    import obow_multihost_worker
    c = obow_multihost_worker.tiny_config(fast=True)
    c.data.limit = 64
    c.eval.update(dict(linear_protocol="imagenet_r50_obow", linear_batch_size=16,
                       linear_epochs=2, linear_checkpoint_every_steps=3, batch_size=32,
                       protocols=("linear",), test_limit=32))
    c.task = "evaluate"
    with common.restore(c, str(tmp_path)) as run:
        run.checkpointer.save(0, run.state, c)
    calls = []
    real = AL.augmented_linear_probe
    monkeypatch.setattr(AL, "augmented_linear_probe",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    results = tasks.run(c, str(tmp_path))
    linear_result = results["obow step 0"]["linear"]
    assert set(linear_result) == {"top1", "train_top1"} and 0 <= linear_result["top1"] <= 1
    assert len(calls) == 1 and calls[0]["crop"] == 16 and calls[0]["protocol"]["batch_size"] == 16
    folder = tmp_path / "eval" / "linear" / "step_0"
    assert sorted(os.listdir(folder / "checkpoints")) == ["6", "8"]  # 4 steps/epoch, 2 epochs
    saved = json.loads((folder / "result.json").read_text())
    assert saved["result"] == linear_result
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results
