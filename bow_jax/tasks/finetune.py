"""The `finetune` task: semi-supervised fine-tuning (1% / 10% of the labels) of the student
backbone of a workdir's newest checkpoint, or of a torchvision `.pth` file; results in
<workdir>/eval/finetune.{json,md}."""
import json
import os

import jax
import ml_collections

from bow_jax.lib import logs
from bow_jax.data.splits import load_split
from bow_jax.evaluate import finetune
from bow_jax.export import torchvision
from bow_jax.lib import files
from bow_jax.methods import common as method_common
from bow_jax.tasks import common

READS_RUN = False
SECTION = "finetune"


def default_config() -> ml_collections.ConfigDict:
    """config.finetune; the defaults are the OBoW recipe (evaluate/finetune.py)."""
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
    return f


def results_table(results: dict) -> str:
    """Markdown: one row per network, one 'fine-tune <subset> top-1' column per subset (in %)."""
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    table = ["| network | " + " | ".join(f"fine-tune {n} top-1" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for net, runs in results.items():
        table.append(f"| {net} | " + " | ".join(
            f"{100 * runs[n]['top1']:.2f}" if n in runs else "" for n in names) + " |")
    return "\n".join(table) + "\n"


def write_finetune_results(workdir: str, network: str, name: str, result: dict) -> dict:
    """Adds result under results[network][name] in <workdir>/eval/finetune.json (+ .md), atomic."""
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
    return (method_common.backbone_from_config(config), variables,
            f"{config.method} step {run_.restored_step}")


def labelled_subset(config, train):
    """Indices of the labelled subset from config.finetune.subset_file (image folders: file names
    or indices), or None (then `finetune` draws a class-balanced subset with a seed)."""
    cfg = config.finetune
    if not cfg.subset_file:
        return None
    # Image folders: the names of the examples actually loaded, in order.
    names = list(train.filenames) if config.data.source == "image_folder" else None
    return finetune.read_subset_file(cfg.subset_file, len(train), names)


def run(config, workdir: str) -> dict:
    """Fine-tunes the pre-trained backbone on config.data's labelled subset; scores the test
    split; writes <workdir>/eval/finetune.{json,md}. Returns the result dict."""
    cfg = config.finetune
    backbone, variables, network = pretrained_backbone(config, workdir)
    train, test = load_split(config, "train"), load_split(config, "test")
    mean, std = method_common.normalization(config)
    result = finetune.finetune(backbone, variables, train, test, cfg, mean, std, seed=config.seed,
                               subset=labelled_subset(config, train), log=logs.say)
    name = (f"{finetune.recipe(cfg)['percent']:g}%" if not cfg.subset_file
            else os.path.basename(cfg.subset_file))
    write_finetune_results(workdir, network, name, result)
    logs.say(f"Fine-tuning ({name} of the labels): test top-1 {100 * result['top1']:.2f}%; results in "
          f"{os.path.join(workdir, 'eval', 'finetune.md')}")
    return result
