"""Host-side (TensorFlow) views of one image for streamed TFDS data, e.g. ImageNet.

The same geometric views the methods make on the device for in-memory data, built with stateless
TensorFlow ops keyed by a [2] int64 seed, so a view is a function of (seed, epoch, process,
position) and a resumed pipeline repeats itself. Only geometric ops run here; the photometric
augmentation runs later on the device. TensorFlow is the optional `tfds` extra: it is imported
when a view is built, never when this module is imported.
"""
from __future__ import annotations

from bow_jax.data import pipeline


def tf_jittered_patches(image, seed, *, patch_size: int, jitter: int, keep: int, grid: int = 3):
    """OBoW's CropImagePatches (github.com/valeoai/obow): `keep` of the grid x grid jittered
    patches of a square uint8 image [S, S, 3] -> [keep, patch_size, patch_size, 3].

    step = (S - patch_size - jitter) // (grid - 1); patch (i, j) starts at
    (i * step + U{0..jitter}, j * step + U{0..jitter}); the kept patches are the first `keep` of a
    random permutation (positions as `geometric.jittered_patch_params` on the device).
    """
    tf = pipeline.import_tensorflow()
    size = int(image.shape[0])
    step = (size - patch_size - jitter) // (grid - 1)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    offsets = tf.random.stateless_uniform([grid * grid, 2], seeds[0], 0, jitter + 1,
                                          dtype=tf.int32)
    kept = tf.argsort(tf.random.stateless_uniform([grid * grid], seeds[1]))[:keep]
    cells = tf.range(grid * grid)
    tops = tf.gather((cells // grid) * step + offsets[:, 0], kept)
    lefts = tf.gather((cells % grid) * step + offsets[:, 1], kept)
    return tf.stack([image[tops[i]:tops[i] + patch_size, lefts[i]:lefts[i] + patch_size]
                     for i in range(keep)])


def tf_obow_views(image, seed, *, teacher_size: int, teacher_resize: int, flip: bool,
               num_crops: int, crop_size: int, crop_scale, num_patches: int, patch_size: int,
               patch_source_size: int, patch_source_scale, patch_jitter: int) -> dict:
    """OBoW's uint8 views of one uint8 image tensor [H, W, 3] (Gidaris et al., CVPR 2021):

    'teacher' [teacher_size, teacher_size, 3]: Resize(teacher_resize, or teacher_size when 0) +
    CenterCrop(teacher_size) + flip; 'crops' [num_crops, crop_size, crop_size, 3]:
    RandomResizedCrop(crop_size, crop_scale); 'patches' [num_patches, patch_size, patch_size, 3]
    (only when num_patches > 0): jittered grid patches of one
    RandomResizedCrop(patch_source_size, patch_source_scale).
    """
    tf = pipeline.import_tensorflow()
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3 + num_crops)
    teacher = pipeline.tf_center_crop_resize(image, teacher_resize or teacher_size, teacher_size)
    if flip:
        teacher = pipeline.tf_flip(teacher, seeds[0])
    crops = tf.stack([pipeline.tf_random_resized_crop(image, crop_size, tuple(crop_scale),
                                                      seed=seeds[3 + i])
                      for i in range(num_crops)])
    views = {"teacher": tf.ensure_shape(teacher, (teacher_size, teacher_size, 3)),
             "crops": tf.ensure_shape(crops, (num_crops, crop_size, crop_size, 3))}
    if num_patches > 0:
        source = pipeline.tf_random_resized_crop(image, patch_source_size,
                                                 tuple(patch_source_scale), seed=seeds[1])
        source = tf.ensure_shape(source, (patch_source_size, patch_source_size, 3))
        views["patches"] = tf_jittered_patches(source, seeds[2], patch_size=patch_size,
                                            jitter=patch_jitter, keep=num_patches)
    return views
