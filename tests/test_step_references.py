"""Each method's whole `train_step` against an independent PyTorch reference.

For RotNet, BoWNet and OBoW, one step of `method.train_step` from a state with non-trivial BN
running statistics and non-zero SGD momentum buffers is compared with the same step recomputed in
torch (tests/ref_torch.py): a plain torch.nn ResNet loaded with the same weights, the method's
loss written here from the papers, torch autograd, and `torch.optim.SGD` (weight decay added to
the gradient, then momentum, then the learning rate). Compared: every parameter, every momentum
buffer, every BN running statistic, the loss (and metrics the step reports).

Tolerances: both sides compute in float32 with different summation orders. After one step with
lr 0.1, parameters and momentum buffers agree to atol 2e-5 + rtol 1e-4 (observed max |diff| is
~1e-6); a lost gradient moves them by lr x grad, orders of magnitude more. Each test ends with its
negative control: the same comparison against a step whose student features pass through
`jax.lax.stop_gradient` must raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

import ref_torch  # noqa: E402  (tests/ is on sys.path, pytest's rootdir import mode)
from ref_torch import F, nn  # noqa: E402
import obow_multihost_worker as obow_worker  # noqa: E402
from bow_jax.config import base_config, sgd  # noqa: E402
from bow_jax.methods import DataInfo, bownet, interface, rotnet  # noqa: E402
from bow_jax.models import create_backbone, resnet  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4
TINY = dict(width=4, stage_sizes=(1, 1, 1, 1), cifar_stem=True)


# ------------------------------------------------------------------------------------------------
# Helpers


def flat(tree, prefix=()):
    return dict(ref_torch._flatten(tree, prefix))  # pylint: disable=protected-access


def trace_of(opt_state):
    """The SGD momentum buffers (optax TraceState.trace) of the optimizer state."""
    traces = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(
        n, optax.TraceState)) if isinstance(s, optax.TraceState)]
    assert len(traces) == 1, opt_state
    return traces[0].trace


def with_random_trace(opt_state, seed):
    """The optimizer state with non-zero momentum buffers, so one step checks the momentum rule."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda n: optax.TraceState(trace=jax.tree.map(
            lambda x: jnp.asarray(rng.normal(0, 0.01, x.shape), jnp.float32), n.trace))
        if isinstance(n, optax.TraceState) else n,
        opt_state, is_leaf=lambda n: isinstance(n, optax.TraceState))


def random_batch_stats(batch_stats, seed):
    """BN running statistics away from their init (mean 0, var 1): eval mode then differs."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape) if p[-1].key == "var"
                                 else rng.normal(0, 0.1, x.shape), jnp.float32), batch_stats)


def normalized(images_uint8, config):
    mean, std = (np.asarray(v, np.float32) for v in interface.normalization(config))
    return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def sgd_config(c, lr=0.1, nesterov=False):
    return sgd(c, lr, weight_decay=5e-4, schedule="constant", nesterov=nesterov)


def run_step(method, state, views, stop_student_features=False, monkeypatch=None):
    """One jitted `method.train_step`; optionally with the student's pooled features cut from
    the gradient (the negative control: a dead gradient into the backbone)."""
    if stop_student_features:
        pool = resnet.global_average_pool
        monkeypatch.setattr(resnet, "global_average_pool",
                            lambda x: jax.lax.stop_gradient(pool(x)))
    try:
        # A fresh lambda: jit must trace again (with or without the patch), not reuse a trace.
        new, metrics = jax.jit(lambda s, v: method.train_step(s, v))(state, views)
    finally:
        if stop_student_features:
            monkeypatch.undo()
    return jax.device_get(new), jax.device_get(metrics)


def assert_step_matches(new_state, want):
    """Params, momentum buffers and BN running statistics of `new_state` vs the reference's
    {'params': {path: v}, 'trace': {path: v}, 'batch_stats': {path: v}}."""
    got = {"params": flat(new_state.params), "trace": flat(trace_of(new_state.opt_state)),
           "batch_stats": flat(new_state.batch_stats)}
    for part in ("params", "trace", "batch_stats"):
        assert set(got[part]) == set(want[part]), part
        for path, value in want[part].items():
            np.testing.assert_allclose(got[part][path], value, atol=ATOL, rtol=RTOL,
                                       err_msg=f"{part} {'/'.join(path)}")


def reference_sgd(pairs, loss, state, config):
    """torch.optim.SGD from the state's momentum buffers; returns the reference's params and
    momentum buffers as {flax path: value}."""
    trace = flat(trace_of(state.opt_state))
    o = config.optim
    buffers = ref_torch.sgd_step(pairs, loss, lr=o.lr, momentum=o.momentum,
                                 weight_decay=o.weight_decay, nesterov=o.nesterov,
                                 buffers=[trace[p] for p, _ in pairs])
    return ref_torch.params_of(pairs), ref_torch.params_of(pairs, buffers)


# ------------------------------------------------------------------------------------------------
# RotNet: CE over the 4B rotated batch, BatchNorm over 4B in train mode, rotation accuracy.


class TorchRotNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ref_torch.ResNet(TINY["stage_sizes"], TINY["width"])
        self.rotation_head = nn.ModuleDict({"fc": nn.Linear(8 * TINY["width"], 4)})

    def forward(self, x):
        return self.rotation_head["fc"](self.backbone(x)["pooled"])


def rot90_ccw(x):
    """The official RotNet's 90-degree rotation, np.flipud(np.transpose(img, (1, 0, 2))), on
    NCHW: transpose H and W, then flip the rows."""
    return x.transpose(2, 3).flip(2)


def rotnet_reference(state, views, config):
    model = TorchRotNet()
    pairs = ref_torch.load(model, state.params, state.batch_stats)
    model.train()
    x = ref_torch.nchw(normalized(views["image"], config))
    rotated, labels = [], []
    for k in range(4):  # rotation-major here (the step is image-major: the order must not matter)
        rotated.append(x)
        labels.append(torch.full((len(x),), k))
        x = rot90_ccw(x)
    logits = model(torch.cat(rotated))  # one train-mode pass: BN statistics over all 4B inputs
    labels = torch.cat(labels)
    loss = F.cross_entropy(logits, labels)
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    params, trace = reference_sgd(pairs, loss, state, config)
    return {"params": params, "trace": trace, "loss": loss.item(), "accuracy": accuracy,
            "batch_stats": ref_torch.bn_stats(model, state.batch_stats)}


def test_rotnet_step_matches_torch(monkeypatch):
    c = base_config("rotnet")
    c.model.name = "resnet18"
    c.model.kwargs.update(TINY)
    c.data.normalization = "cifar"
    c.batch_size = 8
    sgd_config(c, nesterov=True)  # the demo's Nesterov momentum
    method = rotnet.create(c, DataInfo((8, 8, 3), 64, 8, 80))
    state = jax.jit(method.init_state)(jax.random.key(0))
    state = jax.device_get(state.replace(
        step=jnp.int32(3), batch_stats=random_batch_stats(state.batch_stats, 1),
        opt_state=with_random_trace(state.opt_state, 2)))
    views = {"image": np.random.default_rng(3).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)}

    want = rotnet_reference(state, views, c)
    new, metrics = run_step(method, state, views)
    assert_step_matches(new, want)
    assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=1e-5)
    assert float(metrics["rotation_accuracy"]) == pytest.approx(want["accuracy"], abs=1e-6)
    assert int(new.step) == 4

    dead, _ = run_step(method, state, views, stop_student_features=True, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError, match="backbone"):
        assert_step_matches(dead, want)


# ------------------------------------------------------------------------------------------------
# BoWNet: eval-mode frozen teacher's BoW targets from the vocabulary, CutMix, cosine head (eq. 5)
# with a learned gamma, soft cross-entropy (eq. 6).


class TorchCosineHead(nn.Module):
    def __init__(self, channels, num_words):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_words, channels))  # rows are the w_k
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return self.gamma * z @ (self.weight / self.weight.norm(dim=1, keepdim=True)).T


class TorchBoWNet(nn.Module):
    def __init__(self, num_words):
        super().__init__()
        self.backbone = ref_torch.ResNet(TINY["stage_sizes"], TINY["width"])
        self.bow_head = TorchCosineHead(8 * TINY["width"], num_words)

    def forward(self, x):
        return self.bow_head(self.backbone(x)["pooled"])


def bownet_reference(state, views, config, layer):
    """Eq. 1 + 3 on the eval-mode teacher's map, CutMix (box and partner drawn from the step's
    key: only the draw is shared), eq. 5 + 6 on the train-mode student, torch SGD."""
    teacher = ref_torch.ResNet(TINY["stage_sizes"], TINY["width"])
    ref_torch.load(teacher, state.teacher["params"], state.teacher["batch_stats"])
    teacher.eval()
    with torch.no_grad():
        fmap = teacher(ref_torch.nchw(normalized(views["teacher"], config)))[layer]
    fmap = fmap.numpy().transpose(0, 2, 3, 1).astype(np.float64)
    vocab = np.asarray(state.vocabulary, np.float64)
    words = ((fmap[..., None, :] - vocab) ** 2).sum(-1).argmin(-1).reshape(len(fmap), -1)
    k = len(vocab)
    counts = np.stack([np.bincount(w, minlength=k) for w in words]).astype(np.float64)
    targets = counts / counts.sum(1, keepdims=True)

    x = normalized(views["student"], config)  # jitter_p = gray_p = 0: no photometric change
    _, mix_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    b, h, w = x.shape[:3]
    from bow_jax.data import geometric  # pylint: disable=import-outside-toplevel
    partner, box = jax.device_get(geometric.cutmix_params(mix_key, b, h, w,
                                                          config.bownet.cutmix_beta))
    y1, y2, x1, x2 = (int(v) for v in box)
    assert (y2 - y1) * (x2 - x1) > 0 and (partner != np.arange(b)).any()  # a real mix
    mixed = x.copy()
    mixed[:, y1:y2, x1:x2] = x[partner, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    targets = lam * targets + (1 - lam) * targets[partner]

    model = TorchBoWNet(k)
    pairs = ref_torch.load(model, state.params, state.batch_stats)
    model.train()
    loss = ref_torch.soft_cross_entropy(model(ref_torch.nchw(mixed)),
                                        torch.from_numpy(targets.astype(np.float32)))
    params, trace = reference_sgd(pairs, loss, state, config)
    return {"params": params, "trace": trace, "loss": loss.item(),
            "batch_stats": ref_torch.bn_stats(model, state.batch_stats)}


def test_bownet_step_matches_torch(monkeypatch):
    c = base_config("bownet")
    c.model.name = "resnet18"
    c.model.kwargs.update(TINY)
    c.data.normalization = "cifar"
    c.batch_size = 8
    sgd_config(c)
    b = c.bownet
    b.teacher_layer, b.num_words, b.gamma_init = "layer2", 8, 1.5
    b.jitter_p = b.gray_p = 0.0  # photometric perturbations are tested in test_augment
    b.flip = False
    images = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 8, 3), dtype=np.uint8)
    views = {"teacher": images[0], "student": images[1]}

    # The frozen inputs: a random teacher with its own running statistics (eval mode matters),
    # and words taken from its map, so the assignments spread over the vocabulary.
    teacher = create_backbone("resnet18", **TINY)
    t_vars = jax.device_get(teacher.init(jax.random.key(5), jnp.zeros((1, 8, 8, 3)), train=False))
    t_vars = {"params": t_vars["params"],
              "batch_stats": jax.device_get(random_batch_stats(t_vars["batch_stats"], 6))}
    fmap = np.asarray(teacher.apply(t_vars, normalized(views["teacher"], c),
                                    train=False)["layer2"])
    vocab = fmap.reshape(-1, fmap.shape[-1])[np.random.default_rng(7).choice(
        fmap.shape[0] * 16, 8, replace=False)]
    monkeypatch.setattr(bownet, "load_frozen_inputs",
                        lambda cfg, shape: (teacher, t_vars, vocab.astype(np.float32)))
    method = bownet.create(c, DataInfo((8, 8, 3), 64, 8, 80))
    monkeypatch.undo()
    state = jax.jit(method.init_state)(jax.random.key(0))
    state = jax.device_get(state.replace(
        step=jnp.int32(2), batch_stats=random_batch_stats(state.batch_stats, 8),
        opt_state=with_random_trace(state.opt_state, 9)))

    want = bownet_reference(state, views, c, "layer2")
    new, metrics = run_step(method, state, views)
    assert_step_matches(new, want)
    assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=1e-5)
    assert float(new.params["bow_head"]["gamma"]) != pytest.approx(1.5, abs=1e-4)  # learned
    # The teacher and the vocabulary are frozen.
    for x, y in zip(jax.tree.leaves(new.teacher), jax.tree.leaves(state.teacher)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(new.vocabulary, state.vocabulary)

    dead, _ = run_step(method, state, views, stop_student_features=True, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError, match="backbone"):
        assert_step_matches(dead, want)


# ------------------------------------------------------------------------------------------------
# OBoW: the student's parameters after a step (targets from the EMA teacher, one BN pass per crop
# group, the dynamic BoW head against the pre-step vocabulary, sum over groups of the mean over
# levels of the soft cross-entropy).


class TorchGenerator(nn.Module):
    def __init__(self, channels_in, hidden, channels_out):
        super().__init__()
        self.fc1 = nn.Linear(channels_in, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, channels_out)

    def forward(self, words):  # official BoWPredictor's weight generator
        h = F.relu(self.bn(self.fc1(F.normalize(words, dim=1))))
        return F.normalize(self.fc2(h), dim=1)


class TorchOBoWStudent(nn.Module):
    def __init__(self, level_channels, hidden):
        super().__init__()
        channels = 8 * TINY["width"]
        self.backbone = ref_torch.ResNet(TINY["stage_sizes"], TINY["width"])
        self.bow_head = nn.ModuleDict({f"generator_{l}": TorchGenerator(c, hidden, channels)
                                       for l, c in enumerate(level_channels)})


def np_obow_targets(fmap, vocab, m, inv_delta, momentum, border=1):
    """OBoW eq. 4 (official BoWExtractor): border skip, squared L2, statistic updated before the
    codes, softmax(-inv_delta / m * d), max over locations, L1."""
    f = np.asarray(fmap, np.float64)[:, border:-border, border:-border]
    dist = ((f[..., None, :] - np.asarray(vocab, np.float64)) ** 2).sum(-1)
    m_new = momentum * m + (1 - momentum) * dist.min(-1).mean()
    logits = -(inv_delta / m_new) * dist
    codes = np.exp(logits - logits.max(-1, keepdims=True))
    bow = (codes / codes.sum(-1, keepdims=True)).max(axis=(1, 2))
    return bow / bow.sum(-1, keepdims=True)


def obow_reference(state, views, config):
    cfg = config.obow
    t = int(state.step)
    alpha = 1.0 - (1.0 - cfg.teacher_momentum) * 0.5 * (1.0 + np.cos(
        np.pi * t / obow_worker.TOTAL_STEPS))
    teacher_params = jax.tree.map(lambda a, s: alpha * np.float64(a) + (1 - alpha) * s,
                                  state.teacher_params, state.params["backbone"])
    teacher = ref_torch.ResNet(TINY["stage_sizes"], TINY["width"])
    ref_torch.load(teacher, teacher_params, state.teacher_batch_stats)
    teacher.train()  # the official teacher runs in train mode (batch statistics)
    with torch.no_grad():
        maps = teacher(ref_torch.nchw(normalized(views["teacher"], config)))
    targets = [torch.from_numpy(np_obow_targets(
        maps[level].numpy().transpose(0, 2, 3, 1), state.vocabularies[i],
        float(state.mean_min_dist[i]), cfg.inv_delta, cfg.stat_momentum).astype(np.float32))
        for i, level in enumerate(cfg.bow_levels)]

    channels = [np.asarray(v).shape[1] for v in state.vocabularies]
    model = TorchOBoWStudent(channels, 2 * 8 * TINY["width"])
    pairs = ref_torch.load(model, state.params, state.batch_stats)
    model.train()
    vocabs = [torch.from_numpy(np.array(v, np.float32)) for v in state.vocabularies]
    weights = [model.bow_head[f"generator_{l}"](v) for l, v in enumerate(vocabs)]
    loss = 0.0
    for name in ("crops", "patches"):  # one student pass per crop group (its own BN statistics)
        group = views[name]
        n = group.shape[1]
        x = normalized(group.reshape((-1,) + group.shape[2:]), config)
        z = model.backbone(ref_torch.nchw(x))["pooled"]
        per_level = [ref_torch.soft_cross_entropy(cfg.kappa * z @ w.T,
                                                  tgt.repeat_interleave(n, dim=0))
                     for w, tgt in zip(weights, targets)]
        loss = loss + torch.stack(per_level).mean()  # mean over levels, sum over groups
    params, trace = reference_sgd(pairs, loss, state, config)
    return {"params": params, "trace": trace, "loss": loss.item(),
            "batch_stats": ref_torch.bn_stats(model, state.batch_stats),
            "teacher_params": teacher_params}


def test_obow_student_step_matches_torch(monkeypatch):
    config = obow_worker.tiny_config()  # two levels, crops and patches, no photometric draws
    sgd_config(config)
    from bow_jax.data.splits import load_split  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import create_method, data_info_for  # pylint: disable=C0415
    method = create_method(config, data_info_for(config, load_split(config, "train")))
    state = jax.jit(obow_worker.prepared_state(method, config))()
    state = jax.device_get(state.replace(
        batch_stats=random_batch_stats(state.batch_stats, 10),
        opt_state=with_random_trace(state.opt_state, 11)))
    views = obow_worker.random_views(config)

    want = obow_reference(state, views, config)
    new, metrics = run_step(method, state, views)
    assert_step_matches(new, want)
    assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=1e-5)
    for path, value in flat(want["teacher_params"]).items():
        np.testing.assert_allclose(flat(new.teacher_params)[path], value, atol=1e-6)

    dead, _ = run_step(method, state, views, stop_student_features=True, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError, match="backbone"):
        assert_step_matches(dead, want)
