"""The fields of a dataset section: config.data (what training reads) and config.eval.data
(another dataset to evaluate on, e.g. Places205; `eval_input.evaluation_data` decides which the
evaluation reads). One definition, so the two sections always have the same fields."""
import ml_collections

from bow_jax.data.datasets import DEFAULT_CANVAS_SIZE


def data_fields(source: str = "npz") -> ml_collections.ConfigDict:
    """A dataset section with every field at its default; `source` '' marks config.eval.data
    unset (the evaluation then reads config.data)."""
    d = ml_collections.ConfigDict()
    d.source = source  # 'npz' | 'jpeg_npz' | 'digits' | 'image_folder' | 'tfds'
    d.path = ""  # folder (npz, jpeg_npz, image_folder) holding the splits
    d.name = ""  # TFDS name
    d.data_dir = ""  # TFDS data_dir
    d.image_size = 0  # resize on load (digits, image folders); 0 = keep
    d.normalization = "cifar"  # 'cifar' | 'imagenet'
    d.limit = 0  # use only the first N training images (0 = all): quick runs
    d.num_examples = 0  # TFDS only, when split sizes are unknown (mock data)
    d.in_memory = True  # False: stream a TFDS training split through tf.data (ImageNet)
    d.canvas_size = DEFAULT_CANVAS_SIZE  # streamed: each decoded image is padded into a canvas of this side
    #                      (a longer side is first shrunk to it); the views are cut on the device
    d.max_unreadable_fraction = 0.05  # image folders: undecodable files up to this share are
    #                                   skipped with a warning naming them; more: an error
    return d
