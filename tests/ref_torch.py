"""Independent PyTorch references for the training-step tests (tests/test_step_references.py).

A torchvision-style BasicBlock ResNet written here in plain torch.nn (not bow_jax's export table),
loaded from a Flax variable tree by name, and PyTorch's own SGD (`torch.optim.SGD`: weight decay
added to the gradient, then momentum, then the learning rate) as the optimizer. Each method's
loss is recomputed by the test from the same views and weights, with torch autograd.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var", "gamma": "gamma"}


class Block(nn.Module):
    """3x3(stride)-BN-ReLU-3x3-BN (+ 1x1(stride)-BN shortcut when the shape changes), ReLU."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = stride != 1 or cin != planes
        if self.shortcut:
            self.downsample_conv = nn.Conv2d(cin, planes, 1, stride, 0, bias=False)
            self.downsample_bn = nn.BatchNorm2d(planes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = self.downsample_bn(self.downsample_conv(x)) if self.shortcut else x
        return F.relu(y + s)


class ResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 stride-1 conv, no max-pool), BasicBlocks; forward(x NCHW)
    returns {'layer1'.., 'pooled'} (maps NCHW)."""

    def __init__(self, stage_sizes, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleDict()
        self.stages = []
        cin = width
        for i, n in enumerate(stage_sizes):
            names = []
            for j in range(n):
                planes = width * 2 ** i
                self.blocks[f"layer{i + 1}_{j}"] = Block(cin, planes, 2 if i > 0 and j == 0 else 1)
                cin = planes
                names.append(f"layer{i + 1}_{j}")
            self.stages.append(names)

    def forward(self, x):
        out = {}
        x = F.relu(self.bn1(self.conv1(x)))
        for i, names in enumerate(self.stages):
            for name in names:
                x = self.blocks[name](x)
            out[f"layer{i + 1}"] = x
        out["pooled"] = x.mean(dim=(2, 3))
        return out


def _flatten(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, np.asarray(tree)


def _torch_name(path, module_prefix):
    mods = [("blocks." + m) if m.startswith("layer") else m for m in path[:-1]]
    return ".".join(module_prefix + mods + [_LEAF[path[-1]]])


def to_torch_layout(value):
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # conv HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # dense [in, out] -> [out, in]
        return value.T
    return value


def load(module, params, batch_stats, module_prefix=()):
    """Copies the Flax `params` / `batch_stats` trees into `module` by name; returns the list of
    (flax path, torch parameter) of the params, in Flax leaf order, for later comparisons.
    Every torch parameter and BN buffer must be written (checked)."""
    named = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    pairs, written = [], set()
    with torch.no_grad():
        for path, value in _flatten(params):
            name = _torch_name(path, list(module_prefix))
            named[name].copy_(torch.from_numpy(to_torch_layout(value).copy()))
            pairs.append((path, named[name]))
            written.add(name)
        for path, value in _flatten(batch_stats):
            name = _torch_name(path, list(module_prefix))
            buffers[name].copy_(torch.from_numpy(to_torch_layout(value).copy()))
            written.add(name)
    missing = [n for n in list(named) + list(buffers)
               if n not in written and not n.endswith("num_batches_tracked")]
    assert not missing, f"torch tensors not loaded from the Flax tree: {missing}"
    return pairs


def nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32)
                                                  .transpose(0, 3, 1, 2)))


def soft_cross_entropy(logits, targets):
    """Mean over rows of -sum_k t_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def sgd_step(pairs, loss, lr, momentum, weight_decay, nesterov, buffers=None):
    """One torch.optim.SGD step on the torch parameters of `pairs` (optionally starting from
    momentum `buffers`, a list of numpy arrays in Flax layout). Returns the new momentum buffers
    in Flax layout."""
    tensors = [t for _, t in pairs]
    opt = torch.optim.SGD(tensors, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    if buffers is not None:
        for t, b in zip(tensors, buffers):
            opt.state[t]["momentum_buffer"] = torch.from_numpy(to_torch_layout(b).copy())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [opt.state[t]["momentum_buffer"] for t in tensors]


def params_of(pairs, tensors=None):
    """{flax path: value in Flax layout} of the torch parameters of `pairs` (or of `tensors`, e.g.
    momentum buffers, one per pair)."""
    tensors = [t for _, t in pairs] if tensors is None else tensors
    out = {}
    for (path, param), t in zip(pairs, tensors):
        value = t.detach().numpy()
        if param.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif param.ndim == 2:
            value = value.T
        out[path] = value
    return out


def bn_stats(module, batch_stats, module_prefix=()):
    """{flax path: torch running statistic in Flax layout} for every leaf of `batch_stats`."""
    buffers = dict(module.named_buffers())
    return {path: buffers[_torch_name(path, list(module_prefix))].detach().numpy()
            for path, _ in _flatten(batch_stats)}
