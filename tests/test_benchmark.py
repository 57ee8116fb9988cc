"""scripts/benchmark.py on tiny settings: rows for every variant (each in its own process by
default), remat's losses equal to fp32's within the stated tolerance, JSON written after every
row, the peak memory of each variant its own (injected allocator statistics: CPU has none),
`--warmup 0`, exit 0 with a failing loss check reported in the row, FLOPs columns (XLA and the
analytic count, the latter checked by hand); the k-means subcommand dispatches."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402
from bow_jax.models import create_backbone  # noqa: E402

TINY = ["--config", os.path.join(REPO, "configs/obow_cifar10_cpu.py"),
        "--set", "model.kwargs.width=4", "--set", "obow.num_words=64", "--batch_size", "16",
        "--steps", "1"]


def test_train_step_benchmark_rows_and_remat_check(tmp_path, monkeypatch):
    # Each variant runs in its own process (--isolate auto); as fast to compile as in conftest.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    out = tmp_path / "bench.json"
    assert benchmark.main(TINY + ["--warmup", "2", "--variants", "fp32,remat",
                                  "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["train_step"]
    assert result["complete"] and result["failed"] == []
    assert [r["variant"] for r in rows] == ["fp32", "remat"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["global_batch"] == 16
        assert len(row["first_losses"]) == 2
        assert row["devices"] == 8  # the child inherited conftest's 8 fake devices
        assert row["peak_bytes"] is None  # CPU: no allocator statistics
    fp32, remat = (r["first_losses"] for r in rows)
    assert remat == pytest.approx(fp32, rel=1e-5)
    assert rows[1]["loss_check"]["ok"]
    assert rows[1]["loss_check"]["result"].startswith("ok: rel err")


class FakeAllocator:
    """memory_stats() of an allocator whose process peak never resets: variant i allocates
    peaks[i] bytes at most, and frees everything at its end."""

    def __init__(self, peaks):
        self.peaks, self.calls, self.peak = list(peaks), 0, 0

    def __call__(self, device):
        del device
        if self.calls % 2 == 1:  # the end of a variant: its own peak has happened
            self.peak = max(self.peak, self.peaks[self.calls // 2])
        self.calls += 1
        return {"bytes_in_use": 0, "peak_bytes_in_use": self.peak}


def test_warmup0_bf16_failing_check_peaks_and_flops(tmp_path, monkeypatch, capsys):
    # fp32 peaks at 900 bytes, then bf16 at 500: bf16 must not report fp32's 900.
    monkeypatch.setattr(benchmark, "read_memory_stats", FakeAllocator([900, 500]))
    out = tmp_path / "bench.json"
    status = benchmark.main(TINY + ["--warmup", "0", "--variants", "bf16", "--bf16_rtol",
                                    "1e-12", "--isolate", "never", "--json", str(out)])
    assert status == 0  # every figure was written; the failed check is in the row
    fp32, bf16 = json.loads(out.read_text())["train_step"]
    assert len(fp32["first_losses"]) == len(bf16["first_losses"]) == 1
    check = bf16["loss_check"]
    assert not check["ok"] and check["result"].startswith("fail: rel err")
    assert f"obow_cifar10_cpu bf16 loss vs fp32: {check['result']}" in capsys.readouterr().err
    assert (fp32["peak_bytes"], fp32["peak_scope"]) == (900, "variant")
    assert bf16["peak_bytes"] is None and bf16["peak_bytes_bound"] == 900
    for row in (fp32, bf16):
        assert row["xla_flops_per_image"] > 0 and row["analytic_flops_per_image"] > 0
        assert row["compiled_bytes_per_image"] == pytest.approx(
            row["compiled_bytes"] / (16 / row["devices"]))
        # The analytic count leaves out elementwise work: XLA's count is near it, not below it
        # by much (a missing backward pass would halve it, a doubled one add ~50%).
        assert 0.9 < row["xla_flops_per_image"] / row["analytic_flops_per_image"] < 1.3


def test_peak_of_a_later_variant_that_rises_is_its_own():
    before, after = {"peak_bytes_in_use": 900, "bytes_in_use": 10}, {"peak_bytes_in_use": 1200}
    assert benchmark.peak_fields(before, after, isolated=False)["peak_bytes"] == 1200
    assert benchmark.peak_fields(before, {"peak_bytes_in_use": 900},
                                 isolated=True)["peak_bytes"] == 900  # alone in its process
    assert benchmark.peak_fields(None, None, isolated=False)["peak_bytes"] is None


def test_json_rows_written_as_measured(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    calls = []

    def fake_bench_step(config, variant, **kwargs):
        calls.append(variant)
        if variant == "bf16":
            raise RuntimeError("out of memory")
        if variant == "remat":
            raise SystemExit("killed by a timeout")  # nothing after this runs
        return {"variant": variant, "images_per_s": 1.0, "first_losses": [1.0]}

    monkeypatch.setattr(benchmark, "bench_step", fake_bench_step)
    with pytest.raises(SystemExit):
        benchmark.main(TINY + ["--variants", "fp32,bf16,remat", "--isolate", "never",
                               "--json", str(out)])
    result = json.loads(out.read_text())
    assert calls == ["fp32", "bf16", "remat"]
    assert [r["variant"] for r in result["train_step"]] == ["fp32"]
    assert result["failed"] == [{"config": "obow_cifar10_cpu", "variant": "bf16",
                                 "error": "RuntimeError: out of memory"}]
    assert result["complete"] is False


def test_obow_analytic_flops_by_hand():
    parts = benchmark.obow_analytic_flops(
        forward_flops_ref=1000.0, ref_size=40, teacher_size=40, crop_groups=[(2, 20), (1, 10)],
        levels=[(5, 5, 8)], border=1, num_words=16, pooled_dim=4, hidden_dim=6, global_batch=2,
        monitor_dim=4, num_classes=3)
    # student: 2 crops x 3 x 1000 (20/40)^2 + 1 x 3 x 1000 (10/40)^2 = 1500 + 187.5
    assert parts["student_backbone"] == 1687.5
    assert parts["teacher_backbone"] == 1000.0
    assert parts["word_distances"] == 2 * 3 * 3 * 16 * 8  # 3x3 locations inside the border
    assert parts["bow_logits"] == 3 * 1 * 3 * 2 * 4 * 16  # 3 crops, 1 level
    # generator: (2*16*8*6 fwd x 2 + 2*16*6*4 fwd x 3) per step / 2 images
    assert parts["weight_generators"] == (1536 * 2 + 768 * 3) / 2
    assert parts["monitor"] == 2 * 4 * 3 * 2
    assert parts["total"] == pytest.approx(1687.5 + 1000 + 2304 + 1152 + 2688 + 48)


def test_backbone_flops_scale_with_the_square_of_the_side():
    """The analytic count's assumption, checked on XLA's count of a tiny CIFAR-stem ResNet-18.

    XLA counts only the kernel taps that fall inside the (unpadded) map, so small maps cost a
    little less than side^2 says: at 32 the last stage is 4x4, where a 3x3 kernel has 69% of its
    taps inside, against 77% at 8x8 (side 64).
    """
    backbone = create_backbone("resnet18", width=4, cifar_stem=True)
    f32, f64 = (benchmark.backbone_forward_flops(backbone, s) for s in (32, 64))
    assert 4.0 < f64 / f32 < 4.4
    # The first 3x3 convolution alone: 32*32 pixels x 3*3*3 inputs x 4 outputs x 2.
    assert f32 > 2 * 32 * 32 * 27 * 4


@pytest.mark.parametrize("cost", [{"flops": 6.0}, [{"flops": 2.0}, {"flops": 4.0}]])
def test_cost_flops_accepts_a_dict_or_a_list(cost):
    assert benchmark.cost_flops(cost) == 6.0
    assert benchmark.cost_flops(None) is None and benchmark.cost_flops([{}]) is None


def test_kmeans_subcommand(tmp_path):
    out = tmp_path / "kmeans.json"
    benchmark.main(["kmeans", "--n", "2000", "--d", "8", "--k", "16", "--iters", "2",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["name"] for r in result["results"]} >= {"ours lloyd", "sklearn KMeans"}
