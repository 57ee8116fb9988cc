"""scripts/benchmark.py end to end on tiny settings: rows for every variant, remat's losses equal
to fp32's within the stated tolerance, JSON written; the k-means subcommand dispatches."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402


def test_train_step_benchmark_rows_and_remat_check(tmp_path):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--config", os.path.join(REPO, "configs/obow_cifar10_cpu.py"),
                    "--set", "model.kwargs.width=4", "--set", "obow.num_words=64",
                    "--batch_size", "16", "--steps", "1", "--warmup", "2",
                    "--variants", "fp32,remat", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["train_step"]
    assert [r["variant"] for r in rows] == ["fp32", "remat"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["global_batch"] == 16
        assert len(row["first_losses"]) == 2
    fp32, remat = (r["first_losses"] for r in rows)
    assert remat == pytest.approx(fp32, rel=1e-5)
    assert rows[1]["loss_check"]["ok"]


def test_kmeans_subcommand(tmp_path):
    out = tmp_path / "kmeans.json"
    benchmark.main(["kmeans", "--n", "2000", "--d", "8", "--k", "16", "--iters", "2",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["name"] for r in result["results"]} >= {"ours lloyd", "sklearn KMeans"}
