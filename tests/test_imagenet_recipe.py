"""The main job's config, `configs/obow_resnet50.py`, end to end from the command line on a tiny
TFDS dataset shaped like ImageNet (`scripts/tiny_tfds.py`: real digits as JPEGs of varying
sizes): a few OBoW steps at width 4 with the k-NN monitor, then the recipe's own evaluation
(augmented-image linear probe, few-shot, k-NN on Resize + CenterCrop 224 features). The command
is the README's ("ImageNet recipes on a laptop")."""
import json
import os
import subprocess
import sys

import pytest

from bow_jax.lib import writers

tfds = pytest.importorskip("tensorflow_datasets")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The README's command after `--workdir` (quotes for the shell there; argv items here).
TINY = ["--config.data.name=digits_jpeg", "--config.model.kwargs.width=4",
        "--config.batch_size=16", "--config.num_train_steps=4", "--config.log_every=2",
        "--config.eval.every_steps=2", "--config.eval.monitor_memory=256",
        "--config.eval.monitor_queries=64", "--config.eval.batch_size=64",
        "--config.eval.train_limit=512", "--config.eval.linear_epochs=2",
        "--config.eval.linear_batch_size=64", "--config.eval.fewshot_classes=random:8:0",
        "--config.eval.fewshot_ways=5"]


def test_obow_resnet50_trains_and_scores_itself_from_the_command_line(tmp_path):
    data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "tiny_tfds.py"),
                    "--data_dir", data_dir], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "bow_jax.main", "--config=configs/obow_resnet50.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    rows = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows if "knn_top1" in r] == [2, 4]  # the monitor, every 2 steps
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        result = json.load(f)["obow step 4"]
    assert 0.0 <= result["linear"]["top1"] <= 1.0
    assert set(result["fewshot"]) == {"5way_1shot", "5way_5shot"}
    assert 0.0 <= result["knn"]["top1"] <= 1.0
    # The linear probe trained on augmented images (its checkpoints and result file), and the
    # evaluation read Resize + CenterCrop 224 images: the cached features say so.
    assert os.path.isfile(os.path.join(workdir, "eval", "linear", "step_4", "result.json"))
    with open(os.path.join(workdir, "eval", "features", "step_4", "pooled", "test.json")) as f:
        assert "224" in json.dumps(json.load(f)["key"]["transform"])
    assert "Evaluation of tfds data" in out.stdout + out.stderr
