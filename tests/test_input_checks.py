"""Inputs checked before any work, each fault injected and what the user sees checked:
- a symbolic link loop in an image folder is skipped with a warning naming the link (the
  images are neither multiplied nor mislabelled), while a link to a folder outside the tree works;
- tuple-valued fields of the methods' views (crop scales, ratios, jitter, blur, levels) are
  checked for length and range, naming the field, its value and what is expected;
- tasks that do not train (evaluate, export, ...) skip the training batch's checks: an OBoW run
  with 128 words trained on 8 devices is evaluated on 3;
- resuming a checkpoint with another batch size, seed, length or data warns, field by field.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bow_jax.data import datasets
from bow_jax.lib import config_checks
from bow_jax.lib.errors import InputError
from bow_jax.methods import DataInfo, bownet, create_method, data_info_for, obow, rotnet
from bow_jax.tasks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- 1. symbolic links in image folders ----------------------------------------------------

def _write_class(folder, count: int, value: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(os.path.join(folder, f"{i}.png"))


def _image_folder(tmp_path, classes: int = 6, per_class: int = 3):
    train = tmp_path / "data" / "train"
    for c in range(classes):
        _write_class(train / str(c), per_class, 40 * c)
    return train


def test_a_link_back_into_the_tree_is_skipped_with_a_warning_naming_it(tmp_path):
    train = _image_folder(tmp_path)
    os.symlink("..", train / "0" / "loop")  # the issue's loop: class 0 -> the split folder
    os.symlink("../1", train / "0" / "sibling")  # class 1's images labelled 0
    with pytest.warns(datasets.SymlinkSkippedWarning) as record:
        listing = datasets.list_image_folder(train)
    assert len(listing) == 18  # 6 classes x 3, not 7,380
    np.testing.assert_array_equal(np.bincount(listing.labels), [3] * 6)
    messages = "\n".join(str(w.message) for w in record)
    assert f"{train / '0' / 'loop'} -> {train}: symbolic link not followed: it leads to a " \
           "folder that contains it (a loop)." in messages
    assert f"{train / '0' / 'sibling'} -> {train / '1'}: symbolic link not followed: it leads " \
           "back into the image folder" in messages


def test_links_to_folders_outside_the_tree_are_followed(tmp_path, recwarn):
    train = _image_folder(tmp_path, classes=2)
    elsewhere = tmp_path / "other_disk"
    _write_class(elsewhere / "extra", 2, 200)
    _write_class(elsewhere / "more", 4, 220)
    os.symlink(elsewhere / "extra", train / "2")  # a class folder on another disk
    os.symlink(elsewhere / "more", train / "0" / "more")  # a subfolder of class 0 elsewhere
    os.symlink(elsewhere / "more", train / "0" / "again")  # the same folder twice: once
    os.symlink("..", elsewhere / "extra" / "up")  # a loop outside the tree
    listing = datasets.list_image_folder(train)
    np.testing.assert_array_equal(np.bincount(listing.labels), [3 + 4, 3, 2])
    skipped = [str(w.message) for w in recwarn if w.category is datasets.SymlinkSkippedWarning]
    assert len(skipped) == 2, skipped
    assert any("0/more ->" in m and "already walked" in m for m in skipped), skipped
    assert any("2/up ->" in m and "a loop" in m for m in skipped), skipped


# ---- 2. tuple-valued fields ----------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("crop_scale", (0.5,), r"config.obow.crop_scale=\(0.5,\); expected 2 numbers: \(min, max\) "
                           r"area fraction of the crops with 0 < min <= max <= 1\."),
    ("crop_scale", (0.6, 0.2), r"config.obow.crop_scale=\(0.6, 0.2\); expected \(min, max\)"),
    ("crop_scale", (0.0, 1.0), r"config.obow.crop_scale=\(0.0, 1.0\); expected"),
    ("crop_scale", ("big",), r"config.obow.crop_scale=\('big',\); expected 2 numbers"),
    ("patch_source_scale", (0.6, 1.5), r"config.obow.patch_source_scale=\(0.6, 1.5\)"),
    ("blur_sigma", (0.0, 2.0), r"config.obow.blur_sigma=\(0.0, 2.0\); expected \(min, max\) "
                               r"Gaussian blur sigma with 0 < min <= max\."),
    ("color_jitter", (0.4, 0.4, 0.4), r"config.obow.color_jitter=\(0.4, 0.4, 0.4\); expected 4"),
    ("color_jitter", (0.4, 0.4, 0.4, 0.7), r"hue in \[0, 0.5\]"),
    ("grayscale_p", 1.5, r"config.obow.grayscale_p=1.5; expected a probability in \[0, 1\]\."),
    ("teacher_resize", 200, r"config.obow.teacher_resize=200 is smaller than teacher_size=224"),
])
def test_obow_view_fields_are_checked_for_length_and_range(field, value, expected):
    cfg = obow.default_config()
    cfg[field] = value
    with pytest.raises(InputError, match=expected):
        obow.check_obow_views(cfg)


@pytest.mark.parametrize("field, value, expected", [
    ("crop_scale", (0.2,), r"config.bownet.crop_scale=\(0.2,\); expected 2 numbers"),
    ("crop_ratio", (0.0, 1.3), r"config.bownet.crop_ratio=\(0.0, 1.3\); expected \(min, max\) "
                               r"aspect ratio"),
    ("jitter", (0.4, -0.1, 0.4, 0.1), r"config.bownet.jitter=\(0.4, -0.1, 0.4, 0.1\)"),
    ("jitter_p", -0.1, r"config.bownet.jitter_p=-0.1; expected a probability"),
    ("teacher_resize", -1, r"config.bownet.view_size=0, teacher_resize=-1; expected both >= 0"),
])
def test_bownet_view_fields_are_checked_for_length_and_range(field, value, expected):
    cfg = bownet.default_config()
    cfg[field] = value
    with pytest.raises(InputError, match=expected):
        bownet.check_bownet_config(cfg)


@pytest.mark.parametrize("fields, expected", [
    ({"view": "rrc"}, r"config.rotnet.view='rrc'; expected one of \['crop', 'resized_crop'\]"),
    ({"view": "resized_crop", "crop_scale": (0.5, 0.1)}, r"config.rotnet.crop_scale=\(0.5, 0.1\)"),
    ({"resize": 100, "crop_size": 224}, r"config.rotnet.resize=100 is smaller than crop_size=224"),
    ({"crop_size": -1}, r"config.rotnet.crop_size=-1, crop_padding=4, resize=0; expected all >= 0"),
])
def test_rotnet_view_fields_are_checked(fields, expected):
    cfg = rotnet.default_config()
    cfg.update(fields)
    with pytest.raises(InputError, match=expected):
        rotnet.check_rotnet_config(cfg)


def test_streamed_images_need_a_view_size():
    """Streamed images have no one stored size: RotNet and BoWNet ask for theirs, naming the
    field; in-memory square images lend theirs."""
    with pytest.raises(InputError, match="config.rotnet.crop_size=0 takes the stored images' "
                                         "side, but these are streamed"):
        rotnet.view_size(rotnet.default_config(), None)
    assert rotnet.view_size(rotnet.default_config(), (32, 32, 3)) == 32
    with pytest.raises(InputError, match="config.bownet.view_size=0 takes the stored images' "
                                         "size, but these are streamed"):
        bownet.view_shape(bownet.default_config(), None)
    assert bownet.view_shape(bownet.default_config(), (32, 32, 3)) == (32, 32, 3)


def test_the_issue_s_crop_scale_fails_when_the_method_is_created_not_at_the_first_batch():
    """`--config.obow.crop_scale=(0.5)` reaches the config as (0.5,): `create` refuses it (it
    was an IndexError in data/geometric.py, at the first batch)."""
    config = _demo_config(**{"obow.crop_scale": (0.5,)})
    info = DataInfo((16, 16, 3), 64, 2, 2)
    with pytest.raises(InputError, match=r"^config.obow.crop_scale=\(0.5,\); expected 2 numbers"):
        create_method(config, info)
    create_method(config, info, training=False)  # evaluation does not cut crops
    config.obow.bow_levels = ()
    with pytest.raises(InputError, match=r"config.obow.bow_levels=\(\); expected a non-empty"):
        create_method(config, info, training=False)


def test_config_check_helpers_return_the_values():
    assert config_checks.interval([0.2, 1], "f", 0.0, 1.0) == (0.2, 1.0)
    assert config_checks.color_jitter((0, 0, 0, 0.5), "f") == (0.0, 0.0, 0.0, 0.5)
    assert config_checks.names("layer3", "f") == ("layer3",)
    with pytest.raises(InputError, match=r"f=\(True, 1.0\); expected 2 numbers"):
        config_checks.interval((True, 1.0), "f")


# ---- 3. tasks that do not train ------------------------------------------------------------

def _demo_config(**overrides):
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs",
                                                                              "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def test_training_checks_apply_to_training_only():
    config = _demo_config(batch_size=30)  # 128 words: not a multiple of 30
    info = DataInfo((16, 16, 3), 64, 2, 2)
    with pytest.raises(ValueError, match="config.obow.num_words=128 must be divisible by "
                                         "config.batch_size=30"):
        create_method(config, info)
    create_method(config, info, training=False)
    train = datasets.ArrayDataset(np.zeros((20, 16, 16, 3), np.uint8), np.zeros(20, np.int32), 1,
                                  "zeros")
    with pytest.raises(ValueError, match="config.batch_size=30 must be divisible by"):
        data_info_for(config, train)
    assert data_info_for(config, train, training=False).steps_per_epoch == 40  # demo's field


EVAL_OVERRIDES = {"model.kwargs.width": 4, "num_train_steps": 2, "data.limit": 64,
                  "eval.protocols": ("knn",), "eval.random_init": False,
                  "eval.train_limit": 64, "eval.test_limit": 32, "eval.knn_k": 5,
                  "eval.batch_size": 48}


@pytest.fixture(scope="module")
def obow_run(tmp_path_factory):
    """A workdir holding a checkpoint at step 2 of the demo (OBoW, batch 32, 128 words) made on
    8 devices (conftest), where every training check passes. The state is the initial one:
    compiling training steps would add a minute and test nothing more here."""
    workdir = str(tmp_path_factory.mktemp("obow_run"))
    config = _demo_config(**EVAL_OVERRIDES)
    assert config.obow.num_words == 128 and config.batch_size == 32
    with common.restore(config, workdir) as run:
        run.checkpointer.save(2, run.state.replace(step=np.int32(2)), config)
    return workdir


def test_an_obow_run_of_8_devices_is_evaluated_on_3(obow_run):
    """The issue: batch 32 and 128 words on 8 devices; `evaluate` on 3 devices was refused
    (32 does not divide over 3) though evaluation never makes a training batch."""
    workdir = obow_run
    flags = [f"--config.{k}={v}" for k, v in EVAL_OVERRIDES.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    result = subprocess.run(
        [sys.executable, "-m", "bow_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.task=evaluate", *flags], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 cpu device(s)" in result.stdout
    assert "| obow step 2 |" in result.stdout


# ---- 4. resume with other settings ---------------------------------------------------------

def test_resume_changes_names_only_what_changes_the_run():
    saved = {"batch_size": 32, "seed": 0, "num_epochs": 1, "num_train_steps": 4,
             "optim": {"lr": 0.1}, "data": {"source": "digits", "limit": 0}}
    assert common.resume_changes(saved, saved) == []
    now = {**saved, "num_epochs": 3, "optim": {"lr": 0.5}, "data": {"source": "npz", "limit": 0}}
    # num_epochs is unused while num_train_steps fixes the length; lr is a choice, not data.
    assert common.resume_changes(saved, now) == [("data.source", "digits", "npz")]
    now["num_train_steps"] = -1
    assert ("num_epochs", 1, 3) in common.resume_changes(saved, now)


def test_resuming_with_another_batch_size_or_seed_warns_field_by_field(obow_run, capsys):
    changed = _demo_config(**{**EVAL_OVERRIDES, "batch_size": 64, "seed": 1,
                              "num_train_steps": 6, "data.limit": 128})
    with common.restore(changed, obow_run) as run:
        assert run.restored_step == 2
    err = capsys.readouterr().err
    assert ("warning: resuming step 2 with config.batch_size 32 -> 64 (the checkpoint's -> this "
            "run's): each step reads another number of images and an epoch has another number "
            "of steps: the data order from step 2 on differs from the uninterrupted run's") in err
    assert "To continue the same run, set config.batch_size=32." in err
    assert "config.seed 0 -> 1" in err and "config.data.limit 64 -> 128" in err
    assert "config.num_train_steps 2 -> 6 (the checkpoint's -> this run's): the run's length" in err
    assert "num_epochs" not in err and err.count("warning:") == 4
    with common.restore(changed, obow_run, training=False):  # evaluate, export: nothing to warn
        pass
    assert "warning" not in capsys.readouterr().err
