"""The `finetune` task: semi-supervised fine-tuning (1% / 10% of the labels) of the student
backbone of a workdir's newest checkpoint, or of a torchvision `.pth` file; results in
<workdir>/eval/finetune.{json,md}.

The fine-tuning is checkpointed at the end of every epoch in
<workdir>/eval/finetune/<network>/<subset name>/checkpoints (network: e.g. 'obow_step_200';
subset name: '1%', '10%' or the subset file's name; the last 2 kept) and resumed from there by
the same command after a stop (SIGTERM / SIGINT save the current step and raise
`stop.Stopped`) or a crash; once finished, a rerun reads the result from its last
checkpoint. Another seed or recipe for the same network and subset is refused (ValueError naming
what differs): remove that folder first."""
import json
import os
import re

import jax
import ml_collections

from bow_jax.lib import logs
from bow_jax.data import datasets
from bow_jax.data.eval_input import evaluation_data_field, evaluation_input
from bow_jax.data.splits import load_split
from bow_jax.protocols import semisupervised
from bow_jax.export import torchvision
from bow_jax.lib import files
from bow_jax.methods import interface
from bow_jax.tasks import common

READS_RUN = False
SECTION = "finetune"


def default_config() -> ml_collections.ConfigDict:
    """config.finetune; the defaults are the OBoW recipe (protocols/semisupervised.py)."""
    f = ml_collections.ConfigDict()
    f.preset = "1percent"  # '1percent' | '10percent': percent, epochs and milestones
    f.percent = 0.0  # > 0 overrides the preset's percentage of labels
    f.subset_file = ""  # one index (or image-folder file name) per line; overrides percent
    f.subset_seed = 0  # the class-balanced draw when no file is given
    f.epochs = 0  # > 0 overrides the preset (milestones scale with it unless given)
    f.milestones = ()  # epochs of the x decay; () = the preset's (scaled)
    f.batch_size = 256
    f.lr_trunk = 2e-4
    f.lr_head = 0.5
    f.momentum = 0.9
    f.weight_decay = 0.0
    f.decay = 0.2
    f.crop_size = 0  # RandomResizedCrop output; 0 = the stored image size
    f.crop_scale = (0.08, 1.0)
    f.flip = True
    f.feature = "pooled"  # backbone output under the linear head
    f.eval_every = 0  # epochs between test evaluations (0: only at the end)
    f.torchvision_path = ""  # fine-tune this torchvision .pth instead of the run's checkpoint
    # Streamed TFDS (ImageNet): keep the subset's encoded images in <workdir>/finetune_cache after
    # the first pass (1%: ~1.4 GB, 10%: ~14 GB of disk), so later epochs read only them instead
    # of the whole split.
    f.cache_subset = True
    return f


def results_table(results: dict) -> str:
    """Markdown: one row per network, 'fine-tune <subset> top-1' and 'top-5' columns per subset
    (in %; results written before top-5 was recorded leave that cell empty)."""
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    columns = [(n, k) for n in names for k in ("top1", "top5")]
    table = ["| network | " + " | ".join(f"fine-tune {n} {k[:3]}-{k[3:]}" for n, k in columns)
             + " |", "|---|" + "---|" * len(columns)]
    for net, runs in results.items():
        table.append(f"| {net} | " + " | ".join(
            f"{100 * runs[n][k]:.2f}" if k in runs.get(n, {}) else "" for n, k in columns) + " |")
    return "\n".join(table) + "\n"


def write_finetune_results(workdir: str, network: str, name: str, result: dict) -> dict:
    """Adds result under results[network][name] in <workdir>/eval/finetune.json (+ .md),
    atomic."""
    out_dir = os.path.join(workdir, "eval")
    path = os.path.join(out_dir, "finetune.json")
    results = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results.setdefault(network, {})[name] = result
    if jax.process_index() == 0:
        files.atomic_write_text(path, json.dumps(results, indent=2))
        files.atomic_write_text(os.path.join(out_dir, "finetune.md"), results_table(results))
    return results


def pretrained_backbone(config, workdir: str):
    """(backbone module, its variables, network name) of config.finetune.torchvision_path, else
    of the newest checkpoint of `workdir` (FileNotFoundError when it holds none)."""
    path = config.finetune.torchvision_path
    if path:
        torchvision.import_torch()  # before any TensorFlow import
        backbone, variables = torchvision.encode_torchvision_checkpoint(
            path, config.model.name, config.model.kwargs.to_dict())
        return backbone, variables, f"torchvision {os.path.basename(path)}"
    with common.restore_trained(config, workdir, "fine-tune") as run_:
        variables = jax.device_get(run_.method.backbone_variables(run_.state))
    return (interface.backbone_from_config(config), variables,
            f"{config.method} step {run_.restored_step}")


def subset_indices(config, train):
    """Indices of the labelled subset from config.finetune.subset_file (image folders: file names
    or indices), or None (then `finetune` draws a class-balanced subset with a seed)."""
    cfg = config.finetune
    if not cfg.subset_file:
        return None
    # Image folders: the names of the examples actually loaded, in order.
    names = list(train.filenames) if config.data.source == "image_folder" else None
    return semisupervised.read_subset_file(cfg.subset_file, len(train), names)


def streamed_positions(config, train):
    """The labelled subset's positions in a streamed TFDS split, read (and checked: a name the
    split lacks is a ValueError naming config.finetune.subset_file) before anything is loaded."""
    return semisupervised.tfds_subset_positions(train, semisupervised.recipe(config.finetune),
                                                logs.say)


def finetune_test_input(config):
    """config.data's test split as the evaluation streams it (`evaluation_input`; cut to
    config.eval.test_limit, transform from config.eval.image_size). config.eval.data (another
    dataset for the probes, e.g. Places205) is not the fine-tuning's: its classes differ."""
    if evaluation_data_field(config) != "config.data":
        config = config.copy_and_resolve_references()
        config.eval.data.source = ""
    return evaluation_input(config, "test")


def subset_name(cfg) -> str:
    """The labelled subset's name in the results and the checkpoint folder: '1%' (the recipe's
    percentage) or the basename of config.finetune.subset_file."""
    if cfg.subset_file:
        return os.path.basename(cfg.subset_file)
    return f"{semisupervised.recipe(cfg)['percent']:g}%"


def run(config, workdir: str) -> dict:
    """Fine-tunes the pre-trained backbone on config.data's labelled subset; scores the test
    split; writes <workdir>/eval/finetune.{json,md}. Returns the result dict. Checkpoints and
    resume: see the module docstring.

    A streamed TFDS training split (config.data.in_memory=False, ImageNet) is fine-tuned by
    `semisupervised.finetune_streamed` with the test split read by `evaluation_input`; other
    data are loaded into memory (`semisupervised.finetune`)."""
    cfg = config.finetune
    backbone, variables, network = pretrained_backbone(config, workdir)  # torch before TF
    train = load_split(config, "train")
    streamed = isinstance(train, datasets.TfdsSource)
    positions = streamed_positions(config, train) if streamed else None  # checked before training
    mean, std = interface.normalization(config)
    name = subset_name(cfg)
    checkpoints = os.path.join(workdir, "eval", "finetune", re.sub(r"[^\w.%-]+", "_", network),
                               name, "checkpoints")
    if streamed:
        result = semisupervised.finetune_streamed(
            backbone, variables, train, finetune_test_input(config), cfg, mean, std,
            seed=config.seed, positions=positions, log=logs.say,
            cache_dir=os.path.join(workdir, "finetune_cache") if cfg.cache_subset else None,
            checkpoint_dir=checkpoints)
    else:
        result = semisupervised.finetune(
            backbone, variables, train, load_split(config, "test"), cfg, mean, std,
            seed=config.seed, subset=subset_indices(config, train), log=logs.say,
            checkpoint_dir=checkpoints)
    write_finetune_results(workdir, network, name, result)
    logs.say(f"Fine-tuning ({name} of the labels): test top-1 {100 * result['top1']:.2f}%, "
             f"top-5 {100 * result['top5']:.2f}%; results in "
             f"{os.path.join(workdir, 'eval', 'finetune.md')}")
    return result
