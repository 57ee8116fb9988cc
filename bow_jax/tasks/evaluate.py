"""The `evaluate` task: score the newest checkpoint of a workdir, or a learning curve over the kept
checkpoints of `config.eval.checkpoint_steps`, with the protocols of `config.eval.protocols`.

Both splits are streamed from any source (TFDS, also with config.data.in_memory=False; image
folders; arrays), sharded over the processes, and their features cached in
`<workdir>/eval/features/step_<step>/<feature>/` (`evaluate.cache`); results go to
`<workdir>/eval/results.json` and `results.md`."""
import ml_collections

from bow_jax.data import fields
from bow_jax.protocols import checks, registry, runner
from bow_jax.lib import checkpoint
from bow_jax.lib.errors import InputError
from bow_jax.tasks import common

READS_RUN = True  # reads a trained run: its workdir must exist
SECTION = "eval"


def default_config() -> ml_collections.ConfigDict:
    """config.eval: which protocols score a network, on which feature, with which settings."""
    e = ml_collections.ConfigDict()
    e.after_training = True  # the train task evaluates its final state
    e.feature = "pooled"  # backbone output the probes read (maps are average-pooled)
    e.random_init = False  # also score the same network at random init, side by side
    e.batch_size = 256
    e.protocols = registry.DEFAULT  # ('linear', 'fewshot', 'knn'): the protocols that score a
    #                  network, by name (protocols/registry.py; also 'voc07_svm' on VOC07 data),
    #                  each writing its result under its name in eval/results.json
    e.linear_protocol = "cifar_bownet"
    e.linear_epochs = 0  # > 0 overrides the protocol's epochs (quick runs)
    e.linear_batch_size = 0  # > 0 overrides the protocol's batch (global; augmented protocols:
    #                          a multiple of the device count); 0 = the protocol's
    e.linear_checkpoint_every_steps = 1000  # augmented probes (imagenet_r50_obow) checkpoint
    #                          their head every N steps under <workdir>/eval/linear/ and resume
    e.fewshot_shots = (1, 5)
    e.fewshot_ways = 5
    e.fewshot_queries = 15
    e.fewshot_episodes = 200
    e.fewshot_classes = ""  # the classes episodes draw from: "" = every class of the test split;
    #                         "random:<N>:<seed>" = N of them drawn with numpy seed <seed>; or a
    #                         file of class indices (JSON list, JSON object, or one a line)
    e.fewshot_classes_key = ""  # the list's key when that file is a JSON object (the official
    #                             low-shot file: 'novel_classes_2', 311 test classes)
    e.knn_k = 20  # neighbours of the weighted k-NN (cosine, exp(s / 0.07) weights)
    e.every_steps = 0  # > 0: k-NN monitor during training every N steps and at the end
    #                    (protocols/monitor.py; logged as knn_top1); 0 = off
    e.monitor_memory = 10_000  # its memory: the first N training images
    e.monitor_queries = 5_000  # its queries: the first N test images
    e.test_limit = 0  # evaluate on the first N test images (0 = all)
    e.train_limit = 0  # fit the probes on the first N training images (0 = all): quick looks
    e.image_size = 0  # > 0: evaluate on torchvision Resize(resize_shorter) + CenterCrop(image_size)
    #                   of each image; 0: the source's images as they are (image folders: resized
    #                   to config.data.image_size), or Resize(256) + CenterCrop(224) where their
    #                   sizes vary (ImageNet)
    e.resize_shorter = 0  # shorter side before the centre crop; 0 = round(image_size * 256 / 224)
    e.transform = ""  # with image_size > 0: '' (Resize + CenterCrop) or 'resize_whole' (VOC07:
    #                  Resize(resize_shorter), then the whole image to image_size x image_size)
    e.train_split = ""  # TFDS split(s) read as the training split ('' = 'train'); 'a+b'
    #                    concatenates, e.g. VOC07's trainval 'train+validation'
    e.test_split = ""  # TFDS split(s) read as the test split ('' = the dataset's evaluation split)
    e.cache_features = True  # keep the features in <workdir>/eval/features/<step>/ and reuse them
    e.data = fields.data_fields(source="")  # another dataset to evaluate on (Places205 for an
    #                                        ImageNet-trained net), config.data's fields; source
    #                                        '' = config.data (eval_input.evaluation_data)
    e.checkpoint_steps = ()  # the `evaluate` task scores these kept checkpoints (a learning
    #                          curve; keep them with keep_every_steps); () = the newest
    return e


def score_states(run: common.Run, states) -> dict:
    """Scores each state of `states` (an iterable, e.g. a generator that restores them one at a
    time), plus the random init if `config.eval.random_init`; writes and prints the table."""
    # A state straight from training is scored only when finite (restored ones are verified).
    states = (checkpoint.check_finite(s, f"{run.workdir}: the state at step {int(s.step)}") or s
              for s in states)
    return runner.evaluate_states(run.config, run.workdir, run.method, states, run.mesh,
                                  random_init=bool(run.config.eval.random_init))


def run(config, workdir: str) -> dict:
    """Scores the newest checkpoint of `workdir`, or those of `config.eval.checkpoint_steps`.

    FileNotFoundError when `workdir` holds no checkpoint; ValueError naming the missing steps
    or an evaluation setting the data cannot satisfy."""
    checks.check_evaluation_data(config)
    with common.restore_trained(config, workdir, "evaluate") as run_:
        steps = [int(s) for s in config.eval.checkpoint_steps]
        if not steps:
            return score_states(run_, [run_.state])
        kept = sorted(run_.checkpointer.all_steps())
        missing = sorted(set(steps) - set(kept))
        if missing:
            raise InputError(f"config.eval.checkpoint_steps: no checkpoint at steps {missing} in "
                             f"{run_.checkpointer.directory}; kept: {kept}.")
        abstract = checkpoint.abstract_like(run_.state)
        run_.state = None  # one state in memory at a time
        return score_states(run_, (run_.checkpointer.restore(abstract, config, step=s)
                                   for s in steps))
