"""The export formats beyond the plain torchvision file: the Detectron2 `.pkl` (names, values, and
a network built from Detectron2's names computing torchvision's features) and the official OBoW
files read as they are (entire model: student / teacher; feature extractor; the release whose fc
is the BoW weights).

References are independent of `bow_jax.export`: torchvision's own ResNet modules (`ResNet`,
`_make_layer`, `Bottleneck`, `BasicBlock`) at a tiny width, the module layout of the official
OBoW code (github.com/valeoai/obow, `obow/feature_extractor.py`, `obow/builder_obow.py`), and
Detectron2's ResNet written here from `detectron2/modeling/backbone/resnet.py`
(github.com/facebookresearch/detectron2). conftest imports torchvision before anything imports
TensorFlow.
"""
import collections
import copy
import pickle
import io
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402

from bow_jax.config import base_config  # noqa: E402
from bow_jax.export import detectron2 as d2_export  # noqa: E402
from bow_jax.export import torchvision as tv_export  # noqa: E402
from bow_jax.lib.errors import InputError  # noqa: E402
from bow_jax.tasks import export as export_task  # noqa: E402

WIDTH = 4


# ------------------------------------------------------------------------------------------------
# References.


def tiny_torchvision_resnet(block, layers, width=WIDTH, seed=0):
    """torchvision's ResNet (its modules, `_make_layer` and forward) with `width` stem channels and
    width * 2^i planes per stage instead of 64 and 64 * 2^i; fc = Identity (pooled features).
    Random weights and non-trivial eval-mode BatchNorm, from `seed`."""
    torch.manual_seed(seed)
    net = tv_resnet.ResNet.__new__(tv_resnet.ResNet)
    nn.Module.__init__(net)
    net._norm_layer, net.inplanes, net.dilation, net.groups, net.base_width = (
        nn.BatchNorm2d, width, 1, 1, 64)
    net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    net.bn1, net.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(3, 2, 1)
    for i, n in enumerate(layers):
        setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2 ** i, n, 1 if i == 0 else 2))
    net.avgpool, net.fc = nn.AdaptiveAvgPool2d(1), nn.Identity()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2 / (m.weight[0].numel())) ** 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.4, 0.9)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def torchvision_layer4(net, x):
    """torchvision's modules in their forward order, to the last feature map (NCHW)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class D2Conv(nn.Conv2d):
    """detectron2.layers.Conv2d: a bias-free conv whose norm is its child 'norm'."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__(cin, cout, k, stride, padding=k // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class D2Bottleneck(nn.Module):
    """Detectron2's BottleneckBlock: conv1 1x1, conv2 3x3, conv3 1x1, shortcut conv when the
    channels change; STRIDE_IN_1X1 puts the stride in conv1, else in conv2."""

    def __init__(self, cin, mid, cout, stride, stride_in_1x1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = D2Conv(cin, cout, 1, stride) if cin != cout else None
        self.conv1, self.conv2 = D2Conv(cin, mid, 1, s1), D2Conv(mid, mid, 3, s3)
        self.conv3 = D2Conv(mid, cout, 1)

    def forward(self, x):
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class D2ResNet(nn.Module):
    """Detectron2's ResNet (BasicStem: conv1 7x7/2 + norm, relu, max-pool 3x3/2; res2..res5),
    channels from `width` as our ResNet's; returns res5 (NCHW)."""

    def __init__(self, width=WIDTH, blocks=(3, 4, 6, 3), stride_in_1x1=False):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = D2Conv(3, width, 7, 2)
        cin = width
        for i, n in enumerate(blocks):
            mid, cout = width * 2 ** i, width * 2 ** i * 4
            setattr(self, f"res{i + 2}", nn.Sequential(*[
                D2Bottleneck(cin if j == 0 else cout, mid, cout, 2 if i and not j else 1,
                             stride_in_1x1) for j in range(n)]))
            cin = cout

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem.conv1(x)), 3, 2, 1)
        return self.res5(self.res4(self.res3(self.res2(x))))


def numpy_state_dict(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def assert_same_variables(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


# ------------------------------------------------------------------------------------------------
# Detectron2.


@pytest.fixture(scope="module")
def r50_export(tmp_path_factory):
    """A tiny ResNet-50 in torchvision's modules, its torchvision export (our variables) and the
    Detectron2 file written from it."""
    net = tiny_torchvision_resnet(tv_resnet.Bottleneck, [3, 4, 6, 3])
    kwargs = {"width": WIDTH}
    params, batch_stats = tv_export.from_torchvision_state_dict(numpy_state_dict(net), "resnet50",
                                                                model_kwargs=kwargs)
    tv = tv_export.to_torchvision_state_dict(params, batch_stats, "resnet50", fc="random",
                                             model_kwargs=kwargs)
    path = tmp_path_factory.mktemp("d2") / "r50.pkl"
    d2_export.save_detectron2(str(path), d2_export.to_detectron2_state_dict(tv))
    return types.SimpleNamespace(net=net, tv=tv, path=str(path), kwargs=kwargs,
                                 variables={"params": params, "batch_stats": batch_stats})


def test_detectron2_pkl_holds_the_torchvision_arrays_under_detectron2_names(r50_export):
    with open(r50_export.path, "rb") as f:
        raw = f.read()
    obj = pickle.loads(raw, encoding="latin1")  # as DetectionCheckpointer._load_file reads it
    assert obj["__author__"] == "bow_jax" and obj["matching_heuristics"] is True
    assert d2_export.load_detectron2(r50_export.path)["model"].keys() == obj["model"].keys()
    model = obj["model"]
    kept = {k: v for k, v in r50_export.tv.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert len(model) == len(kept) == 5 * 53  # 53 convs (+ 1 norm of 4 arrays each)
    for name, tv_name in [("stem.conv1.weight", "conv1.weight"),
                          ("stem.conv1.norm.running_var", "bn1.running_var"),
                          ("res2.0.shortcut.weight", "layer1.0.downsample.0.weight"),
                          ("res3.0.shortcut.norm.bias", "layer2.0.downsample.1.bias"),
                          ("res4.5.conv2.norm.running_mean", "layer3.5.bn2.running_mean"),
                          ("res5.2.conv3.weight", "layer4.2.conv3.weight")]:
        assert np.array_equal(model[name], kept[tv_name]), name
    for tv_name, value in kept.items():  # every array, bit for bit, OIHW
        got = model[d2_export.detectron2_key(tv_name)]
        assert type(got) is np.ndarray and got.dtype == np.float32 and got.flags.writeable
        assert got.shape == value.shape and np.array_equal(got.view(np.uint32),
                                                            value.view(np.uint32)), tv_name
    # Numpy only, through no numpy-internal module (NumPy 2's numpy._core is absent in NumPy 1).
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(raw)).load()
    assert seen == {("numpy", "ndarray"), ("builtins", "bytearray")}


def test_detectron2_names_build_a_network_with_the_torchvision_features(r50_export):
    model = {k: torch.from_numpy(v) for k, v in
             d2_export.load_detectron2(r50_export.path)["model"].items()}
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torchvision_layer4(r50_export.net, torch.from_numpy(x.transpose(0, 3, 1, 2)))
        outputs = []
        for stride_in_1x1 in (False, True):
            d2 = D2ResNet(stride_in_1x1=stride_in_1x1)
            # Strict: every name and shape (torch's BatchNorm fills an absent counter itself).
            d2.load_state_dict(model, strict=True)
            outputs.append(d2.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy())
    assert expected.std() > 0.05
    np.testing.assert_allclose(outputs[0], expected.numpy(), atol=1e-4, rtol=0)
    # STRIDE_IN_1X1: True (Detectron2's MSRA default) would compute other features.
    assert np.abs(outputs[1] - expected.numpy()).max() > 0.05
    # (test_export: the torchvision file computes our backbone's features; not recompiled here.)


def test_detectron2_refuses_unknown_keys_and_other_pickles(tmp_path):
    assert d2_export.detectron2_key("layer3.1.downsample.1.weight") == "res4.1.shortcut.norm.weight"
    with pytest.raises(InputError, match="'head.weight' is not a torchvision ResNet"):
        d2_export.to_detectron2_state_dict({"head.weight": np.zeros(2)})
    with pytest.raises(InputError, match="config.export.path"):
        d2_export.save_detectron2(str(tmp_path / "x.pth"), {})
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"a": collections.OrderedDict()}}))
    with pytest.raises(InputError, match="will not be unpickled"):
        d2_export.load_detectron2(str(evil))


def fake_run(variables, teacher=None):
    """(config, method, state) as the export task sees them, without training or compiling."""
    config = base_config("rotnet")
    config.model.name, config.model.kwargs.width = "resnet50", WIDTH
    state = types.SimpleNamespace(student=variables)
    if teacher is not None:
        state.teacher_params, state.teacher_batch_stats = teacher["params"], teacher["batch_stats"]
    method = types.SimpleNamespace(backbone_variables=lambda s: s.student)
    return config, method, state


def test_export_task_dispatches_by_layout_and_network(r50_export, tmp_path):
    config, method, state = fake_run(r50_export.variables)
    assert config.export.layout == "torchvision" and config.export.network == "student"
    path = export_task.export_state(config, method, state, str(tmp_path / "s.pkl"),
                                    layout="detectron2", fc="zero")
    with open(r50_export.path, "rb") as f, open(path, "rb") as g:
        assert f.read() == g.read()  # the same bytes as the module's own conversion (no fc)
    teacher = jax.tree.map(lambda v: v + 1, r50_export.variables)
    config, method, state = fake_run(r50_export.variables, teacher)
    path = export_task.export_state(config, method, state, str(tmp_path / "t.pkl"),
                                    layout="detectron2", network="teacher")
    tv = tv_export.to_torchvision_state_dict(teacher["params"], teacher["batch_stats"],
                                             "resnet50", fc="none", model_kwargs={"width": WIDTH})
    got = d2_export.load_detectron2(path)["model"]
    assert all(np.array_equal(got[d2_export.detectron2_key(k)], v) for k, v in tv.items()
               if "num_batches" not in k)
    assert export_task.default_path(config, "/w", 9) == "/w/torchvision_resnet50_step9.pth"
    config.export.layout, config.export.network = "detectron2", "teacher"
    assert export_task.default_path(config, "/w", 9) == "/w/detectron2_resnet50_teacher_step9.pkl"


def test_export_config_is_checked_field_by_field(r50_export):
    config, method, state = fake_run(r50_export.variables)
    for field, value, match in [("layout", "caffe2", r"config.export.layout='caffe2'"),
                                ("network", "ema", r"config.export.network='ema'"),
                                ("path", "/w/r50.pth", r"config.export.path='/w/r50.pth'")]:
        bad = copy.deepcopy(config)
        bad.export.layout = "detectron2"
        bad.export[field] = value
        with pytest.raises(InputError, match=match):
            export_task.check_export_config(bad)
    with pytest.raises(InputError, match="config.export.network='teacher'.*no teacher"):
        export_task.network_variables(config, method, state, "teacher")


# ------------------------------------------------------------------------------------------------
# The official OBoW files, read as they are.


def obow_feature_extractor(net):
    """The official `obow/feature_extractor.py` ResNet around torchvision's modules:
    _feature_blocks = [Sequential(Conv, bn, relu, maxpool), layer1, ..., layer4]."""
    module = nn.Module()
    stem = nn.Sequential(collections.OrderedDict(
        [("Conv", net.conv1), ("bn", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]))
    module._feature_blocks = nn.ModuleList([stem, net.layer1, net.layer2, net.layer3, net.layer4])
    return module


@pytest.fixture(scope="module")
def obow_files(tmp_path_factory):
    """A tiny ResNet-18 student and teacher (torchvision's modules) saved as plain torchvision
    files and in the official OBoW layouts."""
    folder = tmp_path_factory.mktemp("obow")
    student = tiny_torchvision_resnet(tv_resnet.BasicBlock, [2, 2, 2, 2], seed=1)
    teacher = tiny_torchvision_resnet(tv_resnet.BasicBlock, [2, 2, 2, 2], seed=2)
    model = nn.Module()  # obow/builder_obow.py OBoW: student, EMA teacher, BoW predictor, ...
    model.feature_extractor = obow_feature_extractor(student)
    model.feature_extractor_teacher = obow_feature_extractor(teacher)
    model.bow_predictor = nn.Linear(8 * WIDTH, 16)
    files = {"student": student.state_dict(), "teacher": teacher.state_dict(),
             # obow/solver.py save_network under DDP: every key starts 'module.'
             "model": {"epoch": 200, "meters": None, "network": collections.OrderedDict(
                 (f"module.{k}", v) for k, v in model.state_dict().items())},
             # OBoWSolver.save_feature_extractor: the student alone
             "extractor": {"epoch": 200, "meters": None,
                           "network": model.feature_extractor.state_dict()},
             # save_feature_extractor_in_torchvision_format: fc = the K x C BoW weights
             "release": {"network": dict(student.state_dict(), **{
                 "fc.weight": torch.randn(8192, 8 * WIDTH), "fc.bias": torch.zeros(8192)})},
             "unknown": {"encoder.weight": torch.zeros(2, 3), "encoder.bias": torch.zeros(2)}}
    paths = {}
    for name, obj in files.items():
        paths[name] = str(folder / f"{name}.pth")
        torch.save(obj, paths[name])
    return paths


def test_official_obow_files_give_the_torchvision_files_variables(obow_files):
    kwargs = {"width": WIDTH}

    def variables(name, network="student"):
        backbone, v = tv_export.encode_torchvision_checkpoint(obow_files[name], "resnet18",
                                                              kwargs, network=network)
        assert backbone.width == WIDTH
        return v

    student, teacher = variables("student"), variables("teacher")
    assert not np.array_equal(student["params"]["conv1"]["kernel"],
                              teacher["params"]["conv1"]["kernel"])
    assert_same_variables(variables("model"), student)  # the default: the student
    assert_same_variables(variables("model", "teacher"), teacher)
    assert_same_variables(variables("extractor"), student)
    assert_same_variables(variables("release"), student)  # the 8192 x C fc dropped
    layouts = {name: tv_export.checkpoint_layout(tv_export.load_torchvision(path))
               for name, path in obow_files.items()}
    assert layouts == {"student": "torchvision", "teacher": "torchvision", "model": "obow_model",
                       "extractor": "obow_feature_extractor", "release": "torchvision",
                       "unknown": ""}


def test_unknown_layouts_and_networks_are_refused_by_name(obow_files):
    with pytest.raises(InputError, match=r"unknown\.pth: none of the known layouts.*"
                                         r"2 keys seen: encoder\.weight, encoder\.bias"):
        tv_export.encode_torchvision_checkpoint(obow_files["unknown"], "resnet18")
    for name in ("student", "extractor", "release"):
        with pytest.raises(InputError, match="config.export.network='teacher'.*one network"):
            tv_export.encode_torchvision_checkpoint(obow_files[name], "resnet18",
                                                    network="teacher")
    with pytest.raises(InputError, match="config.export.network='ema'"):
        tv_export.encode_torchvision_checkpoint(obow_files["model"], "resnet18", network="ema")
