"""scripts/benchmark.py --pipeline on a tiny streamed dataset: the TFDS JPEGs are the upsampled real
images (checked against Pillow's bicubic resize), built once and reused, the rows carry positive
rates per core count with the cores-needed arithmetic, the views have the config's shapes, and the
GPU call's arguments still mean what they meant."""
import io
import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

TINY = ["--pipeline", "--pipeline_images", "12", "--pipeline_image_size", "40x30",
        "--pipeline_cores", "1,2", "--pipeline_batch", "4", "--pipeline_batches", "1",
        "--pipeline_warmup", "0"]


def test_cores_needed_arithmetic():
    assert benchmark.cores_needed(150.0) == 14  # 2000 / 150 = 13.3 -> 14
    assert benchmark.cores_needed(200.0) == 10  # exact: no extra core
    assert benchmark.cores_needed(2500.0) == 1
    assert benchmark.cores_needed(0.0) is None and benchmark.cores_needed(None) is None
    options = benchmark.threading_options(3)
    assert options.threading.private_threadpool_size == 3
    assert options.threading.max_intra_op_parallelism == 1


def test_stream_dataset_is_upsampled_real_images_built_once(tmp_path, monkeypatch):
    builder, source = benchmark.stream_dataset(str(tmp_path), 5, 40, 30)
    images, same_source = benchmark.stream_source_images(5)
    assert source == same_source and source in ("cifar10", "digits")
    assert builder.info.splits["train"].num_examples == 5
    ds = builder.as_dataset(split="train", shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    by_label = {int(e["label"]): e["image"] for e in ds.as_numpy_iterator()}
    for i, image in enumerate(images):
        jpeg = Image.open(io.BytesIO(by_label[i]))
        assert jpeg.format == "JPEG" and jpeg.size == (40, 30)
        reference = np.asarray(Image.fromarray(image).resize((40, 30), Image.BICUBIC), float)
        # JPEG at quality 90 stays within a few grey levels of the bicubic upsampling.
        assert np.abs(np.asarray(jpeg.convert("RGB"), float) - reference).mean() < 6.0
    monkeypatch.setattr(benchmark, "upsampled_jpeg",
                        lambda *a, **k: pytest.fail("the cached dataset was rebuilt"))
    again, _ = benchmark.stream_dataset(str(tmp_path), 5, 40, 30)
    assert again.info.splits["train"].num_examples == 5


def test_pipeline_mode_rows_and_view_shapes(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    assert benchmark.main(TINY + ["--pipeline_data", str(tmp_path / "data"),
                                  "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["train_step"] == []  # --pipeline alone: no train step
    rows = result["pipeline"]
    assert [r["cores"] for r in rows] == [1, 2]
    config = benchmark.load_config(os.path.join(REPO, "configs/obow_resnet50.py"), []).obow
    for row in rows:
        assert row["config"] == "obow_resnet50" and row["batch"] == 4
        assert row["images_per_s"] > 0
        assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / row["cores"])
        assert row["cores_for_target"] == math.ceil(2000 / row["images_per_s_per_core"])
        assert row["views"] == {
            "teacher": [4, config.teacher_size, config.teacher_size, 3],
            "crops": [4, config.num_crops, config.crop_size, config.crop_size, 3],
            "patches": [4, config.num_patches, config.patch_size, config.patch_size, 3],
            "label": [4]}
        assert row["views"]["teacher"][1:3] == [224, 224]  # the recipe's numbers, restated
        assert row["views"]["crops"][1:4] == [2, 160, 160]
        assert row["views"]["patches"][1:4] == [5, 96, 96]
        assert "upsampled" in row["note"]
    printed = capsys.readouterr().out
    assert "| cores for 2000 images/s |" in printed and "decode like ImageNet's" in printed


def test_gpu_call_and_pipeline_defaults_parse():
    args, variants = benchmark.parse_args(
        ["--config", "configs/obow_resnet50.py", "--per_device_batch", "64", "--variants",
         "fp32,bf16", "--steps", "20", "--json", "out.json"])
    assert variants == ["fp32", "bf16"] and not args.pipeline and args.steps == 20
    args, variants = benchmark.parse_args(["--config", "configs/demo.py"])
    assert variants == ["fp32"]  # the train step's default is unchanged
    args, variants = benchmark.parse_args(["--pipeline", "--pipeline_cores", "1,2,4"])
    assert variants == [] and args.pipeline_cores == (1, 2, 4)
    assert args.config == [os.path.join(REPO, "configs/obow_resnet50.py")]
    assert benchmark.parse_args(["--pipeline", "--variants", "fp32"])[1] == ["fp32"]
    with pytest.raises(SystemExit):
        benchmark.parse_args([])  # no config and no --pipeline
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--pipeline", "--pipeline_image_size", "500"])
