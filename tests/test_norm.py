"""models.norm.BatchNorm against torch.nn.BatchNorm1d / BatchNorm2d, and a ResNet-18 trained here,
exported with export.torchvision and loaded strictly into torchvision: same eval-mode outputs."""
import torch  # noqa: F401  (before anything imports TensorFlow: the reverse order can segfault)
import torchvision

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bow_jax.export.torchvision import to_torchvision_state_dict
from bow_jax.lib import sharding
from bow_jax.models import create_backbone
from bow_jax.models.norm import BatchNorm


def torch_bn(num_features, ndim, affine=True, seed=0):
    """A torch BatchNorm (PyTorch defaults: eps 1e-5, momentum 0.1) with random affine params."""
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    bn = cls(num_features, affine=affine).double()
    if affine:
        gen = torch.Generator().manual_seed(seed)
        bn.weight.data = 1 + 0.3 * torch.randn(num_features, generator=gen, dtype=torch.float64)
        bn.bias.data = 0.3 * torch.randn(num_features, generator=gen, dtype=torch.float64)
    return bn


def to_torch(x):
    """NHWC / NC numpy -> float64 NCHW / NC tensor."""
    x = np.asarray(x, np.float64)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)


def from_torch(t):
    y = t.detach().numpy()
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


def our_variables(module, bn, x):
    variables = module.init(jax.random.key(0), jnp.asarray(x), use_running_average=True)
    if "params" in variables:  # copy torch's affine params
        variables = {**variables, "params": {
            "scale": jnp.asarray(bn.weight.detach().numpy(), jnp.float32),
            "bias": jnp.asarray(bn.bias.detach().numpy(), jnp.float32)}}
    return variables


def batches(shape, count, seed=0):
    """`count` float32 batches with per-channel means and spreads far from 0 and 1."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return [(rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.uniform(-2, 2, c))
            .astype(np.float32) for _ in range(count)]


def run_against_torch(shape, affine=True, steps=3, dtype=jnp.float32):
    """Train-mode steps then one eval step in both; asserts outputs and running stats agree."""
    module = BatchNorm(use_scale=affine, use_bias=affine, dtype=dtype)
    bn = torch_bn(shape[-1], len(shape), affine)
    xs = [np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in batches(shape, steps + 1)]
    variables = our_variables(module, bn, xs[0])
    train = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"]))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=2e-2)
    bn.train()
    for x in xs[:steps]:
        y, updates = train(variables, jnp.asarray(x, dtype))
        variables = {**variables, **updates}
        assert y.dtype == dtype
        np.testing.assert_allclose(np.asarray(y, np.float64), from_torch(bn(to_torch(x))), **tol)
        stats = variables["batch_stats"]
        assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
        np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    bn.eval()
    y = module.apply(variables, jnp.asarray(xs[-1], dtype), use_running_average=True)
    np.testing.assert_allclose(np.asarray(y, np.float64), from_torch(bn(to_torch(xs[-1]))), **tol)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 1, 1, 6)], ids=["2d", "2d_n2"])
def test_matches_torch_batchnorm2d(shape):
    run_against_torch(shape)


@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_batchnorm1d(affine):
    run_against_torch((5, 7), affine=affine)


def test_affine_free_has_no_params_and_flax_names_otherwise():
    x = jnp.ones((3, 4))
    assert "params" not in BatchNorm(use_scale=False, use_bias=False).init(
        jax.random.key(0), x, use_running_average=True)
    variables = BatchNorm().init(jax.random.key(0), x, use_running_average=True)
    assert set(variables["params"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]) == {"mean", "var"}
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_bfloat16_input_keeps_float32_statistics():
    """bf16 in and out; the statistics equal torch's (float64) on the bf16 values to ~1e-6."""
    run_against_torch((4, 3, 3, 5), dtype=jnp.bfloat16)


def test_running_var_is_unbiased_unlike_flax():
    """The test that would fail with flax.linen.BatchNorm: n = 2, factor n/(n-1) = 2."""
    x = jnp.asarray([[0.0], [2.0]])
    _, updates = BatchNorm(use_running_average=False).apply(
        BatchNorm().init(jax.random.key(0), x, use_running_average=True), x,
        mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], [0.9 + 0.1 * 2.0], rtol=1e-6)


def test_mask_counts_only_marked_rows():
    x = batches((6, 4), 1)[0]
    mask = np.array([1, 1, 0, 1, 1, 0], bool)
    module = BatchNorm(use_scale=False, use_bias=False)
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    y, updates = module.apply(variables, x, use_running_average=False, mask=mask,
                              mutable=["batch_stats"])
    bn = torch_bn(4, 2, affine=False).train()
    ref = from_torch(bn(to_torch(x[mask])))
    np.testing.assert_allclose(np.asarray(y)[mask], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-6)


def test_train_mode_with_one_value_per_channel_raises():
    module = BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.ones((1, 3)))  # init is allowed
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module.apply(variables, jnp.ones((1, 3)), mutable=["batch_stats"])


def test_statistics_are_global_under_jit_over_a_mesh():
    """No axis_name: a batch sharded over the 8 devices gives the whole batch's statistics."""
    x = batches((8, 2, 2, 3), 1)[0]
    module = BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x)
    forward = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
    mesh = sharding.make_mesh()
    y, updates = forward(sharding.replicate(variables, mesh), sharding.shard_batch(x, mesh))
    bn = torch_bn(3, 4, affine=False).train()
    np.testing.assert_allclose(np.asarray(y), from_torch(bn(to_torch(x))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-6)


# -- End to end: train here, export, load strictly into torchvision, same eval outputs. -----------

def test_trained_resnet18_exports_to_torchvision_with_equal_eval_outputs():
    """Full-width ResNet-18 (torchvision has no other width) at 32x32, batch 4: layer4 is 1x1,
    so its BNs average n = 4 values and the unbiased factor is 4/3 per update."""
    model = create_backbone("resnet18", num_classes=10)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=(2, 4)))
    variables = jax.jit(lambda k: model.init(k, images[0], train=False))(jax.random.key(0))
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean(), upd
        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for x, y in zip(images, labels):
        params, stats, opt_state = step(params, stats, opt_state, x, y)
    assert not np.allclose(stats["layer4_1"]["bn2"]["var"], 1.0)  # the stats did move

    state_dict = to_torchvision_state_dict(params, stats, "resnet18")
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)
    net.eval()
    test = np.asarray(rng.normal(size=(2, 32, 32, 3)), np.float32)
    pooled = {}
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("x", o.flatten(1)))
    with torch.no_grad():
        logits = net(torch.from_numpy(test.transpose(0, 3, 1, 2).copy())).numpy()
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, jnp.asarray(test))
    # Float32 rounding relative to the outputs' scale: after two updates the running statistics
    # are far from the batch's, so eval-mode activations are large (~1e5) but the same.
    for ours, ref in ((out["pooled"], pooled["x"].numpy()), (out["logits"], logits)):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # Exported running_var is ours unchanged (float32 bits), i.e. torch's unbiased convention.
    np.testing.assert_array_equal(state_dict["layer4.1.bn2.running_var"],
                                  np.asarray(stats["layer4_1"]["bn2"]["var"]))
