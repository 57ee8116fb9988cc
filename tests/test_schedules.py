"""Schedules and the optimizer against hand-written references (the reference code's formulas)."""
import math

import ml_collections
import numpy as np
import optax
import pytest

from bow_jax.lib import schedules


def test_step_lr_matches_rotnet_lut():
    # RotNet CIFAR LUT: 0.1 (<60), 0.02 (<120), 0.004 (<160), 0.0008 after; 390 steps/epoch.
    sched = schedules.step_lr(0.1, (60, 120, 160), 0.2, steps_per_epoch=390)
    for epoch, want in [(0, 0.1), (59, 0.1), (60, 0.02), (119, 0.02), (120, 0.004), (160, 0.0008),
                        (199, 0.0008)]:
        for step in (epoch * 390, epoch * 390 + 389):
            assert float(sched(step)) == pytest.approx(want, rel=1e-6), (epoch, step)


def reference_obow_lr(step, lr0, end_lr, epochs, warmup, spe):
    """obow solver.py semantics: per-iteration warm-up from 0, then per-epoch cosine."""
    epoch, it = divmod(step, spe)
    if epoch < warmup:
        return lr0 * (epoch * spe + it) / (warmup * spe)
    return end_lr + (lr0 - end_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_cosine_per_epoch(warmup):
    spe, epochs = 5004, 200
    sched = schedules.warmup_cosine_per_epoch(0.03, 3e-5, epochs, warmup, spe)
    for step in [0, 1, 2500, spe * 10 - 1, spe * 10, spe * 10 + 7, spe * 105 + 3, spe * 200 - 1]:
        want = reference_obow_lr(step, 0.03, 3e-5, epochs, warmup, spe)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    if warmup:
        assert float(sched(0)) == 0.0  # the reference's first step has lr exactly 0


def test_teacher_momentum():
    total = 1000
    assert float(schedules.teacher_momentum(0, total)) == pytest.approx(0.99, abs=1e-7)
    assert float(schedules.teacher_momentum(500, total)) == pytest.approx(0.995, abs=1e-7)
    t = 731
    want = 1 - (1 - 0.99) * 0.5 * (1 + math.cos(math.pi * t / total))
    assert float(schedules.teacher_momentum(t, total)) == pytest.approx(want, abs=1e-7)
    assert float(schedules.teacher_momentum(total - 1, total)) > 0.99999


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_semantics(nesterov):
    """torch.optim.SGD: g += wd·p; buf = m·buf + g; step = g + m·buf (nesterov) or buf; p -= lr·step."""
    optim = ml_collections.ConfigDict(dict(name="sgd", momentum=0.9, nesterov=nesterov,
                                           weight_decay=5e-4))
    lrs = [0.1, 0.1, 0.02]
    tx = schedules.make_optimizer(optim, lambda count: np.asarray(lrs)[count])
    rng = np.random.default_rng(0)
    p = rng.normal(size=5).astype(np.float32)
    grads = [rng.normal(size=5).astype(np.float32) for _ in lrs]
    state = tx.init(p)
    ours = p.copy()
    ref, buf = p.astype(np.float64), np.zeros(5)
    for lr, g in zip(lrs, grads):
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        d = g + 5e-4 * ref
        buf = 0.9 * buf + d
        ref = ref - lr * (d + 0.9 * buf if nesterov else buf)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_unknown_schedule_is_named():
    optim = ml_collections.ConfigDict(dict(schedule="poly", lr=0.1))
    with pytest.raises(ValueError, match="config.optim.schedule"):
        schedules.make_lr_schedule(optim, 10, 10)
