"""Backbones: parameter counts, feature-map shapes, initialisation, BatchNorm numerics, naming.

Big nets are only traced with jax.eval_shape (no FLOPs); real forward passes use tiny widths.
The torchvision parity tests run where torch and torchvision import (skipped otherwise).
"""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.lib import sharding
from bow_jax.models import (NIN, OBoWWideResNet, ResNet, WideResNet, check_feature_names,
                            create_backbone, feature_dims, torchvision_key)
from bow_jax.models import nin as nin_lib
from bow_jax.models import resnet as resnet_lib
from bow_jax.models import wide_resnet as wrn_lib


def abstract_variables(module, input_shape):
    return jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros(input_shape), train=False))


def num_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def init(module, x, seed=0):
    """Real initialisation, jitted: one compiled program is much faster on CPU than eager ops."""
    return jax.jit(lambda k, x: module.init(k, x, train=False))(jax.random.key(seed), x)


def apply(module, variables, x, train, mutable=False, rngs=None, capture_intermediates=False):
    """module.apply(variables, x, train=train, ...), jitted."""
    fn = functools.partial(module.apply, train=train, mutable=mutable,
                           capture_intermediates=capture_intermediates)
    return jax.jit(fn)(variables, x, rngs=rngs)


X = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))  # batch 8: one sample per fake device


@pytest.fixture(scope="module")
def tiny_resnet():
    model = ResNet((1, 1, 1, 1), width=8, cifar_stem=True, num_classes=3)
    return model, init(model, X)


@pytest.fixture(scope="module")
def tiny_wrn():
    model = WideResNet(depth=10, widen_factor=2, dropout_rate=0.3)
    return model, init(model, X)


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# -- Parameter counts. ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    # torchvision's published sizes (ResNet18/34/50_Weights meta "num_params").
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_resnet_param_count_matches_torchvision(name, expected):
    model = create_backbone(name, num_classes=1000)
    assert num_params(abstract_variables(model, (1, 224, 224, 3))) == expected


def resnet_param_formula(stage_sizes, bottleneck, width=64, num_classes=1000, cifar_stem=False):
    """Parameter count of a torchvision ResNet written from the architecture (numpy-free arithmetic)."""
    stem_k = 3 if cifar_stem else 7
    total = 3 * width * stem_k ** 2 + 2 * width
    expansion = 4 if bottleneck else 1
    in_ch = width
    for i, n in enumerate(stage_sizes):
        planes = width * 2 ** i
        out_ch = planes * expansion
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                total += in_ch * planes + 2 * planes + 9 * planes * planes + 2 * planes
                total += planes * out_ch + 2 * out_ch
            else:
                total += 9 * in_ch * planes + 2 * planes + 9 * planes * out_ch + 2 * out_ch
            if stride != 1 or in_ch != out_ch:
                total += in_ch * out_ch + 2 * out_ch
            in_ch = out_ch
    return total + in_ch * num_classes + num_classes


@pytest.mark.parametrize("stage_sizes,bottleneck,width,cifar_stem", [
    ((2, 2, 2, 2), False, 64, False), ((3, 4, 6, 3), True, 64, False),
    ((2, 2, 2, 2), False, 8, True), ((1, 2, 1, 1), True, 16, True)])
def test_resnet_param_count_matches_formula(stage_sizes, bottleneck, width, cifar_stem):
    model = ResNet(stage_sizes, bottleneck, width=width, cifar_stem=cifar_stem, num_classes=10)
    expected = resnet_param_formula(stage_sizes, bottleneck, width, 10, cifar_stem)
    assert num_params(abstract_variables(model, (1, 32, 32, 3))) == expected


def wrn_param_formula(depth, k, num_classes):
    """Parameters of a pre-activation WRN-depth-k with a num_classes fc, from the architecture."""
    n = (depth - 4) // 6
    total, in_ch = 3 * 16 * 9, 16
    for width in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            c_in = in_ch if j == 0 else width
            total += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
            total += c_in * width if c_in != width else 0  # 1x1 projection shortcut
        in_ch = width
    return total + 2 * in_ch + in_ch * num_classes + num_classes


def test_wrn_28_10_param_count():
    # 36,479,194 = WRN-28-10 for CIFAR-10 (the commonly cited 36.5M of Zagoruyko & Komodakis).
    assert wrn_param_formula(28, 10, 10) == 36_479_194
    model = create_backbone("wrn28", widen_factor=10, num_classes=10)
    assert num_params(abstract_variables(model, (1, 32, 32, 3))) == 36_479_194
    tiny = WideResNet(depth=16, widen_factor=2, num_classes=7)
    assert num_params(abstract_variables(tiny, (1, 32, 32, 3))) == wrn_param_formula(16, 2, 7)


def nin_param_formula(num_blocks, w=192):
    units = [(5, 3, w), (1, w, w * 5 // 6), (1, w * 5 // 6, w // 2),
             (5, w // 2, w), (1, w, w), (1, w, w)] + [(3, w, w), (1, w, w), (1, w, w)] * (num_blocks - 2)
    return sum(k * k * cin * cout + 2 * cout for k, cin, cout in units)


@pytest.mark.parametrize("num_blocks,width", [(4, 192), (3, 192), (5, 24)])
def test_nin_param_count(num_blocks, width):
    model = NIN(num_blocks=num_blocks, width=width)
    assert num_params(abstract_variables(model, (1, 32, 32, 3))) == nin_param_formula(num_blocks, width)


# -- Feature maps. ------------------------------------------------------------------------------------

def test_resnet_feature_shapes_imagenet_and_cifar():
    dims = feature_dims(create_backbone("resnet50"), (2, 224, 224, 3))
    assert dims == {"stem": (2, 56, 56, 64), "layer1": (2, 56, 56, 256), "layer2": (2, 28, 28, 512),
                    "layer3": (2, 14, 14, 1024), "layer4": (2, 7, 7, 2048), "pooled": (2, 2048)}
    dims = feature_dims(create_backbone("resnet18"), (2, 160, 160, 3))
    assert dims["layer3"] == (2, 10, 10, 256) and dims["layer4"] == (2, 5, 5, 512)
    dims = feature_dims(create_backbone("resnet18", cifar_stem=True, num_classes=10), (2, 32, 32, 3))
    assert dims == {"stem": (2, 32, 32, 64), "layer1": (2, 32, 32, 64), "layer2": (2, 16, 16, 128),
                    "layer3": (2, 8, 8, 256), "layer4": (2, 4, 4, 512), "pooled": (2, 512),
                    "logits": (2, 10)}


def test_wrn_and_nin_feature_shapes():
    dims = feature_dims(create_backbone("wrn28", widen_factor=10), (2, 32, 32, 3))
    assert dims == {"stem": (2, 32, 32, 16), "block1": (2, 32, 32, 160), "block2": (2, 16, 16, 320),
                    "block3": (2, 8, 8, 640), "pooled": (2, 640)}
    dims = feature_dims(create_backbone("nin"), (2, 32, 32, 3))
    assert dims == {"conv1": (2, 16, 16, 96), "conv2": (2, 8, 8, 192), "conv3": (2, 8, 8, 192),
                    "conv4": (2, 8, 8, 192), "pooled": (2, 192)}
    dims = feature_dims(NIN(num_blocks=4, use_avg_on_conv3=True), (2, 32, 32, 3))
    assert dims["conv3"] == (2, 4, 4, 192) and dims["conv4"] == (2, 4, 4, 192)


def test_named_outputs_of_a_real_forward_pass(tiny_resnet, tiny_wrn):
    nin = NIN(num_blocks=3, width=12)
    cases = [(tiny_resnet[0], tiny_resnet[1], "layer4"), (tiny_wrn[0], tiny_wrn[1], "block3"),
             (nin, init(nin, X[:2]), "conv3")]
    for model, variables, last_map in cases:
        out = apply(model, variables, X[:2], train=False)
        assert {k: v.shape for k, v in out.items()} == feature_dims(model, X[:2].shape)
        np.testing.assert_allclose(out["pooled"], np.mean(np.asarray(out[last_map]), axis=(1, 2)),
                                   rtol=1e-5, atol=1e-6)


def test_wrn_block3_is_post_activation_and_dropout_needs_rng(tiny_wrn):
    model, variables = tiny_wrn
    x = X[:2]
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": key}))
    out, _ = train(variables, x, jax.random.key(0))
    assert float(jnp.min(out["block3"])) >= 0.0
    assert float(jnp.min(out["block1"])) < 0.0  # the residual stream is pre-activation
    other, _ = train(variables, x, jax.random.key(1))
    assert not np.allclose(out["pooled"], other["pooled"])
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    # Projection shortcuts only where the shape changes: the first block of each group here.
    names = {k[0] + "/" + k[1] for k in flat(variables["params"]) if k[1] == "shortcut_conv"}
    assert names == {"block1_0/shortcut_conv", "block2_0/shortcut_conv", "block3_0/shortcut_conv"}


def test_invalid_architectures_raise():
    with pytest.raises(ValueError, match="depth=27"):
        feature_dims(WideResNet(depth=27), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="num_blocks=2"):
        feature_dims(NIN(num_blocks=2), (1, 32, 32, 3))


# -- Factory and name checks. -------------------------------------------------------------------------

def test_create_backbone_names_and_errors():
    assert isinstance(create_backbone("nin"), NIN)
    assert create_backbone("wrn28", widen_factor=2).depth == 28
    assert create_backbone("resnet50").bottleneck
    with pytest.raises(ValueError, match=r"'vgg16'.*resnet18.*wrn28"):
        create_backbone("vgg16")
    with pytest.raises(ValueError, match="does not accept"):
        create_backbone("nin", cifar_stem=True)


def test_check_feature_names():
    dims = feature_dims(create_backbone("resnet18", width=8), (1, 64, 64, 3))
    check_feature_names(["layer3", "layer4"], dims, "config.obow.bow_levels", "resnet18")
    with pytest.raises(ValueError) as err:
        check_feature_names(["layer4", "layer5"], dims, "config.obow.bow_levels", "resnet18")
    message = str(err.value)
    assert message.startswith("config.obow.bow_levels: 'layer5' is not a feature map of resnet18")
    assert "'layer4'" in message and "'pooled'" in message


# -- Initialisation statistics. -----------------------------------------------------------------------

def test_resnet_init_matches_torchvision_scheme():
    model = ResNet((1, 1, 1, 1), bottleneck=True, width=16, num_classes=10)
    params = flat(init(model, jnp.zeros((1, 32, 32, 3)))["params"])
    checked = 0
    for path, value in params.items():
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim == 4:
            kh, kw, _, c_out = value.shape
            std = math.sqrt(2.0 / (kh * kw * c_out))  # kaiming_normal, mode='fan_out', relu
            if value.size >= 2000:  # enough samples for a 10% check on the std
                assert abs(value.std() / std - 1) < 0.1, path
                assert abs(value.mean()) < 0.1 * std, path
                # Plain normal, not truncated: some weights lie beyond 2 std.
                assert np.mean(np.abs(value) > 2 * std) > 0.02, path
                checked += 1
        elif path[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0)
        elif path[-1] == "bias" and path[0] != "fc":
            np.testing.assert_array_equal(value, 0.0)
    assert checked >= 8
    bound = 1 / math.sqrt(params[("fc", "kernel")].shape[0])  # torch.nn.Linear default
    for leaf in ("kernel", "bias"):
        value = np.asarray(params[("fc", leaf)])
        assert np.all(np.abs(value) <= bound) and np.abs(value).max() > 0.8 * bound


def test_nin_init_is_torch_default_conv_init():
    model = NIN(num_blocks=3, width=48)
    params = flat(init(model, jnp.zeros((1, 16, 16, 3)))["params"])
    for path, value in params.items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            kh, kw, c_in, _ = value.shape
            bound = 1 / math.sqrt(kh * kw * c_in)  # kaiming_uniform(a=sqrt(5))
            assert np.all(np.abs(value) <= bound), path
            if value.size >= 2000:
                assert abs(value.std() / (bound / math.sqrt(3)) - 1) < 0.1, path


# -- The official OBoW CIFAR Wide ResNet ('wrn_obow'). --------------------------------------------

def obow_wrn_param_formula(depth, k):
    """Parameters of the official OBoW WRN (no fc), written from the architecture."""
    total, in_ch = 3 * 16 * 9 + 2 * 16, 16  # stem conv + BN
    for width in (16 * k, 32 * k, 64 * k):
        for j in range((depth - 4) // 6):
            c_in = in_ch if j == 0 else width
            total += 9 * c_in * width + 2 * width + 9 * width * width  # conv, BN, conv
            # first block of a group: 1x1 projection (stride or width change, as here) or bn1
            total += c_in * width if j == 0 else 2 * c_in
        total += 2 * width  # the group's closing BN
        in_ch = width
    return total


def test_obow_wrn_16_2_param_count_and_shapes():
    assert obow_wrn_param_formula(16, 2) == 690_384
    model = create_backbone("wrn_obow", depth=16, widen_factor=2, strides=(1, 2, 2))
    assert num_params(abstract_variables(model, (1, 32, 32, 3))) == 690_384
    assert num_params(abstract_variables(OBoWWideResNet(depth=22, widen_factor=3),
                                         (1, 32, 32, 3))) == obow_wrn_param_formula(22, 3)
    assert feature_dims(model, (2, 32, 32, 3)) == {
        "stem": (2, 32, 32, 16), "block1": (2, 32, 32, 32), "block2": (2, 16, 16, 64),
        "block3": (2, 8, 8, 128), "pooled": (2, 128)}
    dims = feature_dims(OBoWWideResNet(strides=(2, 1, 2)), (2, 32, 32, 3))
    assert dims["block1"] == (2, 16, 16, 32) and dims["block2"] == (2, 16, 16, 64)


def test_obow_wrn_structure_and_init():
    model = OBoWWideResNet(depth=16, widen_factor=2)
    params = flat(init(model, jnp.zeros((1, 8, 8, 3)))["params"])
    modules = {path[:-1] for path in params}
    # Projection blocks (first of each group: width or stride changes) have a 1x1 shortcut and
    # no pre-activation BN; identity blocks the reverse; every group closes with its own BN.
    for g in (1, 2, 3):
        assert {(f"block{g}_0", "shortcut_conv"), (f"block{g}_1", "bn1"), (f"block{g}_bn",)} <= modules
        assert (f"block{g}_0", "bn1") not in modules
        assert (f"block{g}_1", "shortcut_conv") not in modules
    assert all(path[-1] in ("kernel", "scale", "bias") for path in params)  # no conv bias
    for path, value in params.items():
        value = np.asarray(value)
        if path[-1] == "kernel" and value.size >= 2000:
            kh, kw, _, c_out = value.shape
            std = math.sqrt(2.0 / (kh * kw * c_out))
            assert abs(value.std() / std - 1) < 0.1 and abs(value.mean()) < 0.1 * std, path
        elif path[-1] in ("scale", "bias"):
            np.testing.assert_array_equal(value, 1.0 if path[-1] == "scale" else 0.0)


def test_obow_wrn_named_maps_are_post_relu_and_pooled_is_block3_average():
    model = OBoWWideResNet(depth=10, widen_factor=1)
    variables = init(model, X)
    for train in (True, False):
        out = apply(model, variables, X, train=train, mutable=["batch_stats"])[0]
        for name in ("stem", "block1", "block2", "block3"):
            assert float(jnp.min(out[name])) >= 0.0 and float(jnp.max(out[name])) > 0.0, name
        np.testing.assert_allclose(out["pooled"], np.asarray(out["block3"]).mean(axis=(1, 2)),
                                   rtol=1e-5, atol=1e-6)


def _np_bn_relu(x, p):
    """Train-mode BN (biased batch variance, eps 1e-5) then ReLU, float64 numpy."""
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return np.maximum((x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"], 0.0)


def _np_conv(x, kernel, stride):
    """Cross-correlation with torch padding (k-1)//2 in numpy: sum over the k*k kernel taps."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (x.shape[1] + 2 * pad - k) // stride + 1
    w_out = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            taps = padded[:, i:i + stride * (h_out - 1) + 1:stride, j:j + stride * (w_out - 1) + 1:stride]
            out += taps @ kernel[i, j]
    return out


@pytest.mark.parametrize("in_ch,out_ch,stride", [(6, 6, 1), (4, 6, 1), (6, 6, 2)],
                         ids=["identity", "widen", "stride"])
def test_obow_wrn_block_follows_the_residual_rule(in_ch, out_ch, stride):
    """identity: x + conv(relu(bn(conv(relu(bn(x)))))); other: conv1x1(x, s) + conv(relu(bn(conv(x, s))))."""
    block = wrn_lib.OBoWWideBlock(out_ch, stride)
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 6, 6, in_ch)))
    variables = init(block, jnp.asarray(x))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: np.asarray(v, np.float64) + (
        0.3 * rng.normal(size=v.shape) if v.ndim == 1 else 0.0), variables["params"])
    got, _ = apply(block, {**variables, "params": jax.tree.map(jnp.float32, params)}, x,
                   train=True, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    if in_ch == out_ch and stride == 1:
        h = _np_conv(_np_bn_relu(x64, params["bn1"]), params["conv1"]["kernel"], 1)
        expected = x64 + _np_conv(_np_bn_relu(h, params["bn2"]), params["conv2"]["kernel"], 1)
    else:
        h = _np_conv(x64, params["conv1"]["kernel"], stride)
        expected = (_np_conv(x64, params["shortcut_conv"]["kernel"], stride)
                    + _np_conv(_np_bn_relu(h, params["bn2"]), params["conv2"]["kernel"], 1))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_obow_wrn_invalid_options_raise():
    with pytest.raises(ValueError, match="depth=15"):
        feature_dims(OBoWWideResNet(depth=15), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="strides"):
        feature_dims(OBoWWideResNet(strides=(1, 2)), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="does not accept"):
        create_backbone("wrn_obow", cifar_stem=True)


# -- BatchNorm numerics. ------------------------------------------------------------------------------

def test_batchnorm_train_and_eval_follow_pytorch(tiny_resnet):
    model, variables = tiny_resnet
    out, updates = apply(model, variables, X, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
    conv1 = np.asarray(updates["intermediates"]["conv1"]["__call__"][0], np.float64)
    bn1 = np.asarray(updates["intermediates"]["bn1"]["__call__"][0], np.float64)
    mean, var = conv1.mean(axis=(0, 1, 2)), conv1.var(axis=(0, 1, 2))  # biased batch variance
    np.testing.assert_allclose(bn1, (conv1 - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    stats = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)  # momentum 0.1
    n = conv1.shape[0] * conv1.shape[1] * conv1.shape[2]  # the running variance is unbiased
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-4, atol=1e-6)

    # Change every sample but the first: in eval mode (running statistics) sample 0's output is
    # unchanged, in train mode (batch statistics) it changes.
    x2 = X.at[1:].set(2.0 * X[1:] + 1.0)
    forward = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"])[0],
                      static_argnums=2)
    np.testing.assert_allclose(forward(variables, X, False)["pooled"][0],
                               forward(variables, x2, False)["pooled"][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward(variables, X, True)["pooled"][0],
                           forward(variables, x2, True)["pooled"][0], atol=1e-4)


def test_batch_stats_are_global_under_jit_over_a_mesh(tiny_resnet):
    """No axis_name, yet a batch sharded over 8 devices gives the single-device result (SyncBN)."""
    model, variables = tiny_resnet
    mesh = sharding.make_mesh()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    expected = forward(variables, X)
    got = forward(sharding.replicate(variables, mesh), sharding.shard_batch(np.asarray(X), mesh))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(tiny_resnet):
    model, variables = tiny_resnet
    bf16 = model.clone(dtype=jnp.bfloat16)
    abstract = abstract_variables(bf16, X.shape)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract))
    out, updates = apply(bf16, variables, X, train=True, mutable=["batch_stats"])
    assert out["layer4"].dtype == jnp.bfloat16 and out["pooled"].dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
    ref, _ = apply(model, variables, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0.05, atol=0.05)


def test_remat_keeps_parameters_outputs_and_gradients(tiny_resnet):
    """remat recomputes block activations in the backward pass: same parameter tree, same
    outputs, same gradients (and the compiled backward stores fewer activations)."""
    model, variables = tiny_resnet
    remat = model.clone(remat=True)
    assert (jax.tree.structure(abstract_variables(remat, X.shape))
            == jax.tree.structure(variables))

    def loss(m, params):
        out, _ = m.apply({**variables, "params": params}, X, train=True, mutable=["batch_stats"])
        return jnp.sum(out["logits"] ** 2) + jnp.sum(out["layer3"])

    for a, b in zip(jax.tree.leaves(jax.grad(loss, argnums=1)(remat, variables["params"])),
                    jax.tree.leaves(jax.grad(loss, argnums=1)(model, variables["params"]))):
        # Float32 rounding at the leaf's own scale: a recomputed forward pass may sum in
        # another order, and an element near 0 of a leaf of magnitude ~50 differs by ~1e-5.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(np.abs(b).max()))
    ref, _ = apply(model, variables, X, train=True, mutable=["batch_stats"])
    out, _ = apply(remat, variables, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-6, atol=1e-6)


# -- PyTorch pooling semantics (numpy reference). -------------------------------------------------------

def test_nin_pooling_matches_torch_semantics():
    x = np.asarray(jax.random.normal(jax.random.key(6), (1, 5, 5, 2)))
    padded_zero = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    padded_inf = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    n = (5 + 2 - 3) // 2 + 1
    avg = np.zeros((1, n, n, 2))
    mx = np.zeros((1, n, n, 2))
    for i in range(n):
        for j in range(n):
            avg[0, i, j] = padded_zero[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum(axis=(0, 1)) / 9.0
            mx[0, i, j] = padded_inf[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(0, 1))
    np.testing.assert_allclose(nin_lib._torch_avg_pool_3x3_s2(jnp.asarray(x)), avg, rtol=1e-6, atol=1e-6)
    got_max = flax.linen.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(got_max, mx, rtol=1e-6)


# -- torchvision naming. ------------------------------------------------------------------------------

def test_torchvision_key_examples():
    assert torchvision_key(("params", "conv1", "kernel")) == "conv1.weight"
    assert torchvision_key(("batch_stats", "bn1", "var")) == "bn1.running_var"
    assert torchvision_key(("params", "layer2_0", "downsample_conv", "kernel")) == \
        "layer2.0.downsample.0.weight"
    assert torchvision_key(("layer4_2", "downsample_bn", "mean")) == "layer4.2.downsample.1.running_mean"
    assert torchvision_key(("params", "layer3_5", "bn3", "scale")) == "layer3.5.bn3.weight"
    assert torchvision_key(("params", "fc", "bias")) == "fc.bias"
    with pytest.raises(ValueError, match="flax_path"):
        torchvision_key(("params", "conv1"))


def test_torchvision_mapping_is_one_to_one():
    for name in ("resnet18", "resnet50"):
        model = create_backbone(name, num_classes=1000)
        keys = [torchvision_key(p) for p in flat(abstract_variables(model, (1, 64, 64, 3)))]
        assert len(keys) == len(set(keys))


# -- Parity with torchvision (only where torch and torchvision import). ----------------------------

def _torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    return torch, torchvision


def _load_torch_weights(torch_model, flax_variables):
    """Flax variables filled from a torch state_dict through `torchvision_key` (inverse layout)."""
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    used = set()
    out = {}
    for path, value in flat(flax_variables).items():
        key = torchvision_key(path)
        tensor = state[key]
        if path[-1] == "kernel":
            tensor = np.transpose(tensor, (2, 3, 1, 0)) if tensor.ndim == 4 else tensor.T
        assert tensor.shape == value.shape, (path, key)
        assert np.array_equal(resnet_lib.to_torch_layout(path, tensor), state[key])
        out[path] = jnp.asarray(tensor)
        used.add(key)
    assert used == {k for k in state if not k.endswith("num_batches_tracked")}
    return flax.traverse_util.unflatten_dict(out)


def _randomise_bn(torch, torch_model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in torch_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(n, generator=gen)
            m.bias.data = 0.2 * torch.randn(n, generator=gen)
            m.running_mean.data = 0.2 * torch.randn(n, generator=gen)
            m.running_var.data = 1 + 0.5 * torch.rand(n, generator=gen)


@pytest.mark.parametrize("arch", ["resnet18", "bottleneck_1111"])
def test_forward_matches_torchvision(arch):
    torch, torchvision = _torchvision()
    torch.manual_seed(0)
    if arch == "resnet18":
        torch_model = torchvision.models.resnet18(num_classes=10)
        model = create_backbone("resnet18", num_classes=10)
    else:  # a one-block-per-stage ResNet-50 layout: Bottleneck v1.5 and every downsample kind
        from torchvision.models.resnet import Bottleneck, ResNet as TorchResNet
        torch_model = TorchResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)
        model = ResNet((1, 1, 1, 1), bottleneck=True, num_classes=10)
    _randomise_bn(torch, torch_model)
    x = np.random.default_rng(0).normal(size=(4, 3, 48, 48)).astype(np.float32)
    variables = _load_torch_weights(torch_model, abstract_variables(model, (1, 48, 48, 3)))
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

    feats = {}
    hooks = [getattr(torch_model, n).register_forward_hook(
        lambda m, i, o, n=n: feats.__setitem__(n, o.detach().numpy().transpose(0, 2, 3, 1)))
        for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")]
    torch_model.eval()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x)).numpy()
    out = apply(model, variables, x_nhwc, train=False)
    np.testing.assert_allclose(out["stem"], feats["maxpool"], rtol=1e-4, atol=1e-4)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        np.testing.assert_allclose(out[name], feats[name], rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=2e-4)

    # Train mode: batch statistics and the running-stat update (both keep the unbiased variance).
    torch_model.train()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x)).numpy()
    out, updates = apply(model, variables, x_nhwc, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=5e-4)
    torch_state = torch_model.state_dict()
    for path, value in flat(updates["batch_stats"]).items():  # every BN's running mean and var
        np.testing.assert_allclose(value, torch_state[torchvision_key(path)].numpy(), rtol=1e-4,
                                   atol=1e-4, err_msg=str(path))


def test_state_dict_keys_cover_torchvision_resnet50():
    _, torchvision = _torchvision()
    torch_keys = {k for k in torchvision.models.resnet50().state_dict()
                  if not k.endswith("num_batches_tracked")}
    model = create_backbone("resnet50", num_classes=1000)
    assert {torchvision_key(p) for p in flat(abstract_variables(model, (1, 64, 64, 3)))} == torch_keys
