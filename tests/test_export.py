"""torchvision export / import: real torchvision loads our files strictly and computes the same
features; JAX -> torch -> JAX is bitwise exact; .pth files are data, never code; atomic writes.

Importing torchvision after TensorFlow can segfault (environment.md). When this file runs in a
process that has already imported TensorFlow (the whole suite: test_data imports it), the tests
that need torchvision run once more in a fresh process and report back (`_torchvision`).
"""
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from bow_jax.export import torchvision as tv_export  # noqa: E402
from bow_jax.models import create_backbone  # noqa: E402
from bow_jax.models.heads import DynamicBoWHead  # noqa: E402
from bow_jax.data.splits import load_split  # noqa: E402
from bow_jax.lib.checkpoint import Checkpointer  # noqa: E402
from bow_jax.methods import create_method, data_info_for  # noqa: E402
from bow_jax.tasks import evaluate as evaluate_task  # noqa: E402
from bow_jax.tasks import evaluate_torchvision  # noqa: E402
from bow_jax.tasks import export as export_task  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_FRESH_PROCESS = "BOW_JAX_TORCHVISION_FRESH_PROCESS"


# ------------------------------------------------------------------------------------------------
# Running the torchvision tests away from TensorFlow.


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    """{test name: (outcome, message)} of this file's `test_tv_*` tests run in a new process."""
    report = tmp_path_factory.mktemp("torchvision") / "report.xml"
    env = dict(os.environ, **{IN_FRESH_PROCESS: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_tv_",
         f"--junitxml={report}", os.path.abspath(__file__)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f"the fresh-process run crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "") + "\n" + (node.text or "")
        results[case.get("name")] = (outcome, message)
    return results


def _torchvision(request):
    """torchvision, or None when this test already ran (and is judged here) in a fresh process."""
    if "tensorflow" in sys.modules and not os.environ.get(IN_FRESH_PROCESS):
        results = request.getfixturevalue("fresh_process_results")
        if request.node.name not in results:
            pytest.fail(f"{request.node.name} did not run in the fresh process.")
        outcome, message = results[request.node.name]
        if outcome == "skipped":
            pytest.skip(message)
        if outcome != "passed":
            pytest.fail(f"in a fresh process (no TensorFlow): {message}")
        return None
    return pytest.importorskip("torchvision")


# ------------------------------------------------------------------------------------------------
# Helpers.


def random_variables(arch, seed=0, **model_kwargs):
    """Our backbone with random weights (numpy, from the variable template: no init compile) and
    non-trivial BN parameters and running statistics, so an eval-mode comparison exercises every
    tensor. BN scales below 1 keep the activations of a deep random net O(0.1-1)."""
    backbone = create_backbone(arch, **model_kwargs)
    rng = np.random.default_rng(seed)
    flat_vars = {}
    for path, spec in tv_export.variable_template(arch, model_kwargs).items():
        shape, leaf = spec.shape, path[-1]
        if leaf == "kernel":  # conv HWIO: kaiming fan-out
            value = rng.normal(0, np.sqrt(2 / (np.prod(shape[:2]) * shape[-1])), shape)
        elif leaf == "scale":
            value = rng.uniform(0.4, 0.9, shape)
        elif leaf in ("bias", "mean"):
            value = rng.normal(0, 0.1, shape)
        else:  # var
            value = rng.uniform(0.5, 2.0, shape)
        flat_vars[path] = value.astype(np.float32)
    return backbone, traverse_util.unflatten_dict(flat_vars)


def our_pooled(backbone, variables, images_nhwc):
    return np.asarray(jax.jit(lambda v, x: backbone.apply(v, x, train=False)["pooled"])(
        variables, images_nhwc))


def flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def flat_scores(scores):
    """{key path: number} of a protocol results dict (non-numeric leaves left out)."""
    return {k: float(v) for k, v in traverse_util.flatten_dict(scores).items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------------
# Export into real torchvision.


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_tv_export_loads_strictly_and_gives_the_same_features(request, arch, tmp_path):
    torchvision = _torchvision(request)
    if torchvision is None:
        return
    backbone, variables = random_variables(arch)
    sd = tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"], arch,
                                             fc="random", seed=3)
    path = tv_export.save_torchvision(str(tmp_path / f"{arch}.pth"), sd)

    net = getattr(torchvision.models, arch)()
    result = net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    net.eval()
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        net.fc = torch.nn.Identity()
        pooled = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = our_pooled(backbone, variables, x)
    assert ours.std() > 0.05  # features that a wrong layout would visibly change
    np.testing.assert_allclose(pooled, ours, atol=1e-4, rtol=0)
    # The written fc is torch.nn.Linear's init and is applied as torch applies it.
    np.testing.assert_allclose(logits, ours @ sd["fc.weight"].T + sd["fc.bias"], atol=1e-4,
                               rtol=0)
    bound = 1 / np.sqrt(sd["fc.weight"].shape[1])
    assert sd["fc.weight"].shape[0] == 1000 and np.abs(sd["fc.weight"]).max() <= bound
    assert sd["bn1.num_batches_tracked"].dtype == np.int64


def test_tv_import_random_torchvision_model_matches_its_forward(request, tmp_path):
    torchvision = _torchvision(request)
    if torchvision is None:
        return
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():  # non-trivial eval-mode BatchNorm
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.data.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)

    backbone, variables = tv_export.encode_torchvision_checkpoint(str(path), "resnet18")
    x = np.random.default_rng(2).normal(size=(2, 48, 48, 3)).astype(np.float32)
    net.eval()
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(our_pooled(backbone, variables, x), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Exactness, layouts and files (torch only).


def test_jax_torch_jax_round_trip_is_bitwise_exact(tmp_path):
    _, variables = random_variables("resnet50", seed=4)
    sd = tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"],
                                             "resnet50", fc="none")
    assert "fc.weight" not in sd
    path = tv_export.save_torchvision(str(tmp_path / "r50.pth"), sd)
    params, batch_stats = tv_export.from_torchvision_state_dict(tv_export.load_torchvision(path),
                                                                "resnet50")
    for original, back in ((variables["params"], params),
                           (variables["batch_stats"], batch_stats)):
        a, b = flat(original), flat(back)
        assert a.keys() == b.keys()
        for k in a:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, k
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), k


def test_layouts_and_names_follow_torchvision():
    _, variables = random_variables("resnet18", seed=5, width=8, cifar_stem=True)
    sd = tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"],
                                             "resnet18", fc="zero", num_classes=7,
                                             model_kwargs=dict(width=8, cifar_stem=True))
    p = variables["params"]
    # HWIO -> OIHW, written out index by index.
    kernel = np.asarray(p["layer2_0"]["downsample_conv"]["kernel"])
    out = sd["layer2.0.downsample.0.weight"]
    o, i, h, w = 3, 2, 0, 0
    assert out.shape == (16, 8, 1, 1) and out[o, i, h, w] == kernel[h, w, i, o]
    assert np.array_equal(sd["layer1.1.bn2.weight"], p["layer1_1"]["bn2"]["scale"])
    assert np.array_equal(sd["bn1.running_var"], variables["batch_stats"]["bn1"]["var"])
    assert sd["fc.weight"].shape == (7, 64) and not sd["fc.weight"].any()
    # torchvision's per-BN order: weight, bias, running_mean, running_var, num_batches_tracked.
    keys = list(sd)
    i = keys.index("bn1.weight")
    assert keys[i:i + 5] == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                             "bn1.num_batches_tracked"]
    assert keys[0] == "conv1.weight" and keys[-2:] == ["fc.weight", "fc.bias"]


def test_classifier_round_trip_with_our_fc():
    """A backbone built with num_classes: fc=None exports our fc ([in, out] -> [out, in]) and
    with_fc=True brings it back."""
    _, variables = random_variables("resnet18", width=8, cifar_stem=True, num_classes=5)
    kwargs = dict(width=8, cifar_stem=True)
    sd = tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"],
                                             "resnet18", model_kwargs=kwargs)
    np.testing.assert_array_equal(sd["fc.weight"],
                                  np.asarray(variables["params"]["fc"]["kernel"]).T)
    params, _ = tv_export.from_torchvision_state_dict(sd, "resnet18", model_kwargs=kwargs,
                                                      with_fc=True)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, variables["params"]))
    params, _ = tv_export.from_torchvision_state_dict(sd, "resnet18", model_kwargs=kwargs)
    assert "fc" not in params


def test_wrong_architecture_is_refused_with_the_difference_named():
    _, variables = random_variables("resnet18", width=8, cifar_stem=True)
    with pytest.raises(ValueError, match=r"wrong shape: conv1.weight: \(8, 3, 3, 3\) "
                       r"\(expected \(64, 3, 7, 7\)\).*Pass the model_kwargs"):
        tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"],
                                            "resnet18")
    sd = tv_export.to_torchvision_state_dict(variables["params"], variables["batch_stats"],
                                             "resnet18", model_kwargs=dict(width=8,
                                                                           cifar_stem=True))
    del sd["layer3.1.bn1.running_mean"]
    with pytest.raises(ValueError, match=r"1 missing: layer3.1.bn1.running_mean"):
        tv_export.from_torchvision_state_dict(sd, "resnet18",
                                              model_kwargs=dict(width=8, cifar_stem=True))
    with pytest.raises(ValueError, match="arch='vgg16'"):
        tv_export.from_torchvision_state_dict(sd, "vgg16")


def test_obow_fc_is_kappa_times_generated_weights_in_eval_mode(tmp_path):
    """fc = kappa * G(V) of the last level with the generator BN's running statistics,
    checked against numpy written from the OBoW paper (eq. 4, dynamic head) and the official
    conversion (github.com/valeoai/obow)."""
    rng = np.random.default_rng(0)
    c_out, kappa = 12, 5.0
    vocabs = [rng.normal(size=(16, 6)).astype(np.float32),
              np.abs(rng.normal(size=(32, 10))).astype(np.float32)]
    head = DynamicBoWHead(num_channels_out=c_out, kappa=kappa)
    variables = jax.device_get(head.init(jax.random.key(0), jnp.zeros((1, c_out)), vocabs,
                                         train=False))
    stats = variables["batch_stats"]["generator_1"]["bn"]
    stats["mean"] = rng.normal(size=stats["mean"].shape).astype(np.float32)
    stats["var"] = rng.uniform(0.5, 2, stats["var"].shape).astype(np.float32)
    gp = variables["params"]["generator_1"]
    gp["bn"]["scale"] = rng.uniform(0.5, 1.5, gp["bn"]["scale"].shape).astype(np.float32)

    weight, bias = tv_export.obow_fc(variables, vocabs, kappa)

    def l2n(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    v = l2n(vocabs[1].astype(np.float64))
    h = v @ gp["fc1"]["kernel"]
    h = (h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * gp["bn"]["scale"] + gp["bn"]["bias"]
    expected = kappa * l2n(np.maximum(h, 0) @ gp["fc2"]["kernel"] + gp["fc2"]["bias"])
    np.testing.assert_allclose(weight, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(weight, axis=1), kappa, rtol=1e-5)
    assert weight.shape == (32, c_out) and not bias.any()
    # What the export task reads from an OBoW state (only these fields of obow.OBoWState).
    state = types.SimpleNamespace(params={"bow_head": variables["params"]},
                                  batch_stats={"bow_head": variables["batch_stats"]},
                                  vocabularies=tuple(vocabs))
    config = ml_collections.ConfigDict(dict(method="obow", obow=dict(kappa=kappa)))
    np.testing.assert_array_equal(export_task.obow_state_fc(config, state)[0], weight)

    # The OBoW layout: {'network': state dict} with that fc; load_torchvision unwraps it.
    _, bb = random_variables("resnet18", width=8, cifar_stem=True)
    kwargs = dict(width=8, cifar_stem=True)
    with pytest.raises(ValueError, match="fc = kappa"):
        tv_export.save_torchvision(str(tmp_path / "x.pth"), tv_export.to_torchvision_state_dict(
            bb["params"], bb["batch_stats"], "resnet18", fc="none", model_kwargs=kwargs), "obow")
    wide = rng.normal(size=(32, 64)).astype(np.float32)
    sd = tv_export.to_torchvision_state_dict(bb["params"], bb["batch_stats"], "resnet18",
                                             fc=(wide, np.zeros(32, np.float32)),
                                             model_kwargs=kwargs)
    path = tv_export.save_torchvision(str(tmp_path / "obow.pth"), sd, layout="obow")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["network"] and torch.equal(raw["network"]["fc.weight"],
                                                    torch.from_numpy(wide))
    assert np.array_equal(tv_export.load_torchvision(path)["fc.weight"], wide)


class _RunsCode:
    """Unpickling this object calls open(path, 'w'): a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pth_with_a_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="not a plain state dict.*will not be unpickled"):
        tv_export.load_torchvision(str(path))
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does run it (so the check above can fail).
    try:
        torch.load(path, weights_only=False)
    except Exception:  # pylint: disable=broad-except
        pass
    assert marker.exists()


def test_load_accepts_wrappers_and_module_prefix_and_refuses_non_state_dicts(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for name, obj in (("plain", {"a.weight": t}), ("state", {"state_dict": {"a.weight": t}}),
                      ("network", {"network": {"module.a.weight": t}, "epoch": 3}),
                      ("model", {"model": {"a.weight": t.half()}})):
        torch.save(obj, tmp_path / f"{name}.pth")
        sd = tv_export.load_torchvision(str(tmp_path / f"{name}.pth"))
        assert list(sd) == ["a.weight"] and sd["a.weight"].dtype == np.float32, name
        np.testing.assert_array_equal(sd["a.weight"], t.numpy())
    torch.save([t], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        tv_export.load_torchvision(str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        tv_export.load_torchvision(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tv_export.load_torchvision(str(tmp_path / "missing.pth"))


def test_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    sd = {"a.weight": np.ones((2, 2), np.float32)}
    dest = tmp_path / "out.pth"
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tv_export.save_torchvision(str(dest), sd)
    assert not dest.exists() and os.listdir(tmp_path) == []

    monkeypatch.setattr(torch, "save", real_save)
    tv_export.save_torchvision(str(dest), sd)
    before = dest.read_bytes()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        tv_export.save_torchvision(str(dest), {"b": np.zeros(3, np.float32)})
    assert dest.read_bytes() == before and os.listdir(tmp_path) == ["out.pth"]


# ------------------------------------------------------------------------------------------------
# The export task on a real (tiny) checkpoint, and scoring a torchvision file.


def tiny_rotnet_config():
    from bow_jax.config import base_config
    c = base_config("rotnet")
    c.model.kwargs.width = 4
    c.model.kwargs.cifar_stem = True
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.limit = 64
    c.batch_size = 16
    c.eval.batch_size = 64
    c.eval.test_limit = 64
    # The protocols are tested elsewhere; here: that a torchvision file goes through them.
    c.eval.protocols = ("knn",)
    return c


def test_export_task_writes_the_checkpointed_student_and_it_scores(tmp_path):
    config = tiny_rotnet_config()
    workdir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_task.run(config, workdir)
    assert not os.path.exists(workdir)  # a mistyped --workdir is not created
    # A checkpoint (as training writes it) whose BN statistics are not the init's.
    method = create_method(config, data_info_for(config, load_split(config, "train")))
    state = jax.jit(method.init_state)(jax.random.key(0))
    state = state.replace(step=jnp.int32(7),
                          batch_stats=jax.tree.map(lambda s: s + 0.25, state.batch_stats))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(7, state, config)
    ckpt.close()
    path = export_task.run(config, workdir)
    assert os.path.basename(path) == "torchvision_resnet18_step7.pth"

    expected = jax.device_get(method.backbone_variables(state))
    sd = tv_export.load_torchvision(path)
    assert sd["fc.weight"].shape == (1000, 32) and not sd["fc.weight"].any()
    params, batch_stats = tv_export.from_torchvision_state_dict(
        sd, "resnet18", model_kwargs=dict(width=4, cifar_stem=True))
    for a, b in ((expected["params"], params), (expected["batch_stats"], batch_stats)):
        fa, fb = flat(a), flat(b)
        assert fa.keys() == fb.keys()
        assert all(np.array_equal(np.asarray(fa[k]), fb[k]) for k in fa)

    # The torchvision file is scored by our evaluations, written where `evaluate` writes.
    results = evaluate_torchvision.run(config, str(tmp_path / "eval"), path)
    (name, scores), = results.items()
    assert name == "torchvision torchvision_resnet18_step7.pth"
    assert os.path.exists(tmp_path / "eval" / "eval" / "results.json")
    # ... and scores exactly what its checkpoint scores (the `evaluate` task on the run, same
    # data, same protocols): every number, to 1e-6.
    (own_name, own), = evaluate_task.run(config, workdir).items()
    assert own_name == "rotnet step 7"
    got, want = flat_scores(scores), flat_scores(own)
    # The checkpoint also scores its pretext task (rotation accuracy): a .pth file has none.
    assert ("knn", "top1") in got and set(want) - set(got) == {("pretext", "rotation_accuracy")}
    for key, value in got.items():
        assert value == pytest.approx(want[key], abs=1e-6), key
    assert 0.1 < got[("knn", "top1")] <= 1  # random conv features of digits beat chance

    with pytest.raises(ValueError, match="layout='obow' needs an OBoW run"):
        export_task.export_state(config, method, state, str(tmp_path / "o.pth"), layout="obow")
