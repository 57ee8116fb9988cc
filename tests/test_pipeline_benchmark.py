"""scripts/benchmark.py --pipeline on tiny streamed datasets: the JPEGs are crops of real
photographs (checked pixel for pixel on a small array), built once and reused; the host rows carry
CPU per image per core count with the cores-needed arithmetic, the decode floors and the official
transform's row (a stand-in source tree here; the official source itself where it is present, with
its recipe's view shapes); the device row compares the views' FLOPs with the step's and counts the
bytes per image; the GPU call's arguments still mean what they meant."""
import io
import json
import math
import os
import sys
import tarfile
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

# Tiny: 40x30 files, canvases of 64 (the mixed set's 3.2x files, 128x96, are shrunk to fit),
# a ResNet-50 of width 4 with 64 words for the step's FLOPs.
TINY = ["--pipeline", "--pipeline_images", "12", "--pipeline_image_size", "40x30",
        "--pipeline_cores", "1,2", "--pipeline_batch", "4", "--pipeline_batches", "2",
        "--pipeline_warmup", "0", "--pipeline_passes", "1", "--official_src", "none",
        "--set", "data.canvas_size=64", "--set", "model.kwargs.width=4",
        "--set", "obow.num_words=64", "--views_batch", "2", "--views_image_size", "40x30",
        "--views_step_batches", "4"]
VIEW_BYTES = 224 * 224 * 3 + 2 * 160 * 160 * 3 + 5 * 96 * 96 * 3  # the recipe's uint8 views


def test_cores_needed_arithmetic():
    assert benchmark.cores_needed(150.0) == 14  # 2000 / 150 = 13.3 -> 14
    assert benchmark.cores_needed(200.0) == 10  # exact: no extra core
    assert benchmark.cores_needed(2500.0) == 1
    assert benchmark.cores_needed(0.0) is None and benchmark.cores_needed(None) is None
    options = benchmark.threading_options(3)
    assert options.threading.private_threadpool_size == 3
    assert options.threading.max_intra_op_parallelism == 1
    # The median window is the figure; per core = per CPU-second.
    fields = benchmark.host_fields([0.002, 0.001, 0.004], wall_s=2.0, images=100)
    assert fields["cpu_ms_per_image"] == pytest.approx(2.0)
    assert fields["images_per_cpu_s"] == pytest.approx(500.0)
    assert fields["cores_for_target"] == 4 and fields["images_per_s"] == 50.0


def _find(photo, crop):
    """(top, left, flipped) where `crop` sits in `photo`, or None."""
    h, w = crop.shape[:2]
    for flipped, c in ((False, crop), (True, crop[:, ::-1])):
        for top in range(photo.shape[0] - h + 1):
            for left in range(photo.shape[1] - w + 1):
                if np.array_equal(photo[top:top + h, left:left + w], c):
                    return top, left, flipped
    return None


def test_photo_crops_are_cut_from_the_photograph():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    places = set()
    for _ in range(8):
        crop = np.asarray(benchmark.photo_crop(photo, 8, 6, rng))  # landscape: as it is
        assert crop.shape == (6, 8, 3)
        places.add(_find(photo, crop))
    assert None not in places and len(places) > 2  # varied offsets
    assert {flipped for _, _, flipped in places} == {False, True}
    portrait = np.asarray(benchmark.photo_crop(photo, 6, 16, rng))  # from the turned photo
    assert portrait.shape == (16, 6, 3) and _find(np.rot90(photo), portrait) is not None
    big = benchmark.photo_crop(photo, 40, 30, rng)  # larger than the photograph: resized
    assert big.size == (40, 30)


def test_photo_dataset_built_once_and_described(tmp_path, monkeypatch):
    builder, described = benchmark.stream_dataset(str(tmp_path), "photos", 8, 40, 30)
    assert builder.info.splits["train"].num_examples == 8
    assert described["set"] == "photos" and described["count"] == 8
    assert described["sizes"] == {"40x30": 6, "30x40": 2} and described["jpeg_quality"] == 90
    assert "photographs" in described["note"]
    jpegs = benchmark.stored_jpegs(builder)
    assert len(jpegs) == 8
    shapes = []
    for data in jpegs:
        jpeg = Image.open(io.BytesIO(data))
        assert jpeg.format == "JPEG"
        shapes.append(jpeg.size)
    assert sorted(shapes) == sorted([(40, 30)] * 6 + [(30, 40)] * 2)
    # Stored as made: the photo crops (seeded, so the same files every time).
    assert sorted(jpegs) == sorted(benchmark.benchmark_jpegs("photos", 8, 40, 30)[0])
    assert described["mean_kib"] == pytest.approx(sum(map(len, jpegs)) / 8 / 1024)
    monkeypatch.setattr(benchmark, "benchmark_jpegs",
                        lambda *a, **k: pytest.fail("the cached dataset was rebuilt"))
    again, same = benchmark.stream_dataset(str(tmp_path), "photos", 8, 40, 30)
    assert same == described and again.info.splits["train"].num_examples == 8
    assert benchmark.file_set_sizes("photos_mixed", 4, 500, 375) == [
        (500, 375), (375, 500), (800, 600), (1600, 1200)]


def test_canvas_batch_for_the_device_cost():
    images, sizes = benchmark.canvas_batch(3, 64, (30, 40))
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert sizes.tolist() == [[30, 40], [40, 30], [30, 40]]  # every other one portrait
    assert images[0, 30:].max() == 0 and images[0, :, 40:].max() == 0  # zero outside
    assert images[0, :30, :40].std() > 0
    _, shrunk = benchmark.canvas_batch(2, 64, (375, 500))  # shrunk to fit, as on the host
    assert shrunk.tolist() == [[48, 64], [64, 48]]


def test_pipeline_mode_rows(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    assert benchmark.main(TINY + ["--pipeline_files", "photos_mixed", "--pipeline_data",
                                  str(tmp_path / "data"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["train_step"] == []  # --pipeline alone: no train step
    host = [r for r in result["pipeline"] if r["kind"] == "host"]
    device = [r for r in result["pipeline"] if r["kind"] == "device"]
    assert [(r["pipeline"].split(":")[0], r["cores"]) for r in host] == [
        ("ours", 1), ("ours", 2), ("floor", 1), ("floor", 1),
        ("official OBoW transform (Pillow decode + views + photometric, float tensors)", 1)]
    for row in host[:4]:
        assert row["config"] == "obow_resnet50" and row["files"]["set"] == "photos_mixed"
        assert row["cpu_ms_per_image"] > 0
        assert row["images_per_cpu_s"] == pytest.approx(1000 / row["cpu_ms_per_image"])
        assert row["cores_for_target"] == math.ceil(2000 / row["images_per_cpu_s"])
    for row in host[:2]:
        assert row["canvases"] == {"image": [[4, 64, 64, 3], "uint8"],
                                   "size": [[4, 2], "int32"], "label": [[4], "int32"]}
        assert max(row["max_size"]) <= 64  # the 128x96 files were shrunk to fit
        assert len(row["cpu_ms_per_image_windows"]) == 2
    official = host[4]
    assert official["note"] == "skipped: --official_src none"
    assert "cpu_ms_per_image" not in official
    (views,) = device
    config = benchmark.load_config(os.path.join(REPO, "configs/obow_resnet50.py"), []).obow
    assert views["views"] == {
        "teacher": [2, config.teacher_size, config.teacher_size, 3],
        "crops": [2, config.num_crops, config.crop_size, config.crop_size, 3],
        "patches": [2, config.num_patches, config.patch_size, config.patch_size, 3]}
    assert views["views_uint8_bytes_per_image"] == VIEW_BYTES + 4  # + label
    assert views["canvas_bytes_per_image"] == 64 * 64 * 3 + 8 + 4
    assert views["views_float32_bytes_per_image"] == 4 * VIEW_BYTES + 4
    assert views["image_hw"] == [30, 40]
    assert 0 < views["views_flops_per_image"] and 0 < views["photometric_flops_per_image"]
    (step,) = views["step"]
    assert step["batch"] == 4 and step["xla_lowered_flops_per_image"] > 0
    assert step["views_fraction"] == pytest.approx(
        views["views_flops_per_image"] / step["xla_lowered_flops_per_image"])
    printed = capsys.readouterr().out
    assert "| cores for 2000 images/s | official / ours |" in printed
    assert "Files 'photos_mixed': 12 JPEGs" in printed
    assert "make_views (geometric, on canvases)" in printed


OFFICIAL_STAND_IN = '''
import glob
import os

import numpy as np
from PIL import Image


class Folder:
    def __init__(self, root, crops):
        self.files = sorted(glob.glob(os.path.join(root, "*", "*.jpg")))
        self.crops = crops

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = np.asarray(Image.open(self.files[i]).convert("RGB"), np.float32)
        teacher = image.transpose(2, 0, 1)
        return [teacher, np.stack([teacher] * self.crops)], 0


def get_ImageNet_data_for_obow(data_dir, num_img_crops=2, image_crop_size=160):
    print("transforms ...")
    return (Folder(os.path.join(data_dir, "train"), num_img_crops),
            Folder(os.path.join(data_dir, "val"), 1))
'''
OFFICIAL_STAND_IN_CONFIG = """
data:
  dataset_name: "ImageNet"
  batch_size: 256
  epoch_size:
  num_img_crops: 3
  image_crop_size: 160
"""


def _stand_in_tree(root):
    """A source tree with the official layout (obow/datasets.py, config/...yaml): a stand-in
    written for this test, which needs neither torch nor the official code."""
    tree = root / "obow-stand-in"
    (tree / "obow").mkdir(parents=True)
    (tree / "obow" / "__init__.py").write_text("")
    (tree / "obow" / "datasets.py").write_text(textwrap.dedent(OFFICIAL_STAND_IN))
    config = tree / benchmark.OFFICIAL_CONFIG
    config.parent.mkdir(parents=True)
    config.write_text(OFFICIAL_STAND_IN_CONFIG)
    return tree


def _jpegs(count=3, width=40, height=30):
    return benchmark.benchmark_jpegs("photos", count, width, height)[0]


def test_official_transform_runs_from_a_tree_or_a_tarball(tmp_path, monkeypatch):
    tree = _stand_in_tree(tmp_path / "src")
    found, origin = benchmark.official_source(str(tmp_path / "src"), str(tmp_path / "unused"))
    assert found == str(tree) and origin == str(tmp_path / "src")  # one level down is found
    with tarfile.open(tmp_path / "obow.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="obow-3758504")
    unpacked, origin = benchmark.official_source(str(tmp_path / "obow.tar.gz"),
                                                 str(tmp_path / "tmp"))
    assert unpacked == str(tmp_path / "tmp" / "obow-3758504")
    result = benchmark.time_official(unpacked, _jpegs(), 2, benchmark.OFFICIAL_CONFIG)
    assert result["images"] == 3 and result["passes"] == 2
    assert result["views"] == [[3, 30, 40], [3, 3, 30, 40]]  # the config's 3 crops reached it
    assert result["recipe"] == {"num_img_crops": 3, "image_crop_size": 160}  # no loader keys
    assert result["cpu_ms_per_image"] > 0 and len(result["cpu_ms_per_image_windows"]) == 2
    assert benchmark.official_source("none", str(tmp_path))[0] is None
    monkeypatch.setattr(benchmark, "OFFICIAL_TARBALLS", str(tmp_path / "absent-*.tar.gz"))
    tree, note = benchmark.official_source("", str(tmp_path))
    assert tree is None and note.startswith("skipped:") and "--official_src" in note
    assert benchmark.official_source(str(tmp_path / "tmp" / "obow-3758504" / "config"),
                                     str(tmp_path))[0] is None


def test_official_recipe_where_the_official_source_is_present(tmp_path):
    tree, origin = benchmark.official_source("", str(tmp_path))
    if tree is None:
        pytest.skip(origin)
    pytest.importorskip("torchvision")
    result = benchmark.time_official(tree, _jpegs(), 1, benchmark.OFFICIAL_CONFIG)
    # The official ImageNet recipe: teacher 224, 2 crops of 160, 5 patches of 96, float tensors.
    assert result["views"] == [[3, 224, 224], [2, 3, 160, 160], [5, 3, 96, 96]]
    assert result["dtype"] == "torch.float32" and result["torch_threads"] == 1
    assert result["recipe"]["num_img_patches"] == 5 and result["cpu_ms_per_image"] > 0


def test_gpu_call_and_pipeline_defaults_parse():
    args, variants = benchmark.parse_args(
        ["--config", "configs/obow_resnet50.py", "--per_device_batch", "64", "--variants",
         "fp32,bf16", "--steps", "20", "--json", "out.json"])
    assert variants == ["fp32", "bf16"] and not args.pipeline and args.steps == 20
    args, variants = benchmark.parse_args(["--config", "configs/demo.py"])
    assert variants == ["fp32"]  # the train step's default is unchanged
    args, variants = benchmark.parse_args(["--pipeline", "--pipeline_cores", "1,2,4"])
    assert variants == [] and args.pipeline_cores == (1, 2, 4)
    assert args.pipeline_files == ("photos",) and args.views_step_batches == (64, 256)
    assert args.config == [os.path.join(REPO, "configs/obow_resnet50.py")]
    assert benchmark.parse_args(["--pipeline", "--variants", "fp32"])[1] == ["fp32"]
    assert benchmark.parse_args(["--pipeline", "--pipeline_files", "photos,photos_mixed"]
                                )[0].pipeline_files == ("photos", "photos_mixed")
    with pytest.raises(SystemExit):
        benchmark.parse_args([])  # no config and no --pipeline
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--pipeline", "--pipeline_image_size", "500"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--pipeline", "--pipeline_files", "imagenet"])
