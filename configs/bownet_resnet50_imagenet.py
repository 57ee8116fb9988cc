"""BoWNet paper recipe: ResNet-50 on full ImageNet (Gidaris et al., "Learning Representations by
Predicting Bags of Visual Words", CVPR 2020, section 4.2), RotNet → BoWNet → BoWNet in one command
(task 'bownet_chain', bow_jax/tasks/bownet_chain.py):

  1. RotNet ResNet-50 = configs/rotnet_resnet50_imagenet.py (its schedule and head: see there);
  2. vocabulary: K = 20,000 visual words ("we use a vocabulary of K = 20000 visual words created
     from the 3rd or 4th residual blocks (aka conv4 and conv5 layers respectively) of RotNet"),
     here conv4 = layer3 (14x14x1024 on 224 x 224 views): "BowNet conv4", the model of the
     paper's best ImageNet result (Table 5: 62.1% linear top-1 on pool5, 62.5% best conv layer;
     Table 4: 79.3 VOC07 SVM mAP on its conv5 features). BowNet conv5 (Table 5: 60.2% pool5;
     Table 4: 78.4 VOC07 on its conv5): --config.bownet.teacher_layer=layer4 (7x7x2048);
  3. BoWNet rounds ("trained with 2 training rounds"), each: ResNet-50 v1 from scratch, 224 x 224
     views, SGD momentum 0.9, 140 epochs, lr 0.03 x0.1 after epochs 60, 100 and 130, batch 256,
     weight decay 1e-4 (5004 steps per epoch); binary BoW targets (eq. 4: "we use the binary
     version (4) for ImageNet") of all locations, predicted from the 2048-d pooled feature by the
     cosine head (eq. 5) with the soft cross-entropy (eq. 6); perturbations g(.) = colour jitter,
     grayscale, random resized crop (scale and aspect-ratio distortion), flip, and CutMix;
     round 2's teacher is round 1's student, with its own vocabulary (vocab_2);
  4. evaluation of the RotNet and both students (DIR/eval/results.md).

Views: the teacher sees the unperturbed image as ImageNet is evaluated, Resize(256) +
CenterCrop(224) (view_size 224, teacher_resize 256); the student a 224 x 224 random resized
crop + flip of the same image, then its photometric perturbation and CutMix.

Not in the paper, chosen here: the perturbations' strengths (this repo's BoWNet defaults, kept:
crop scale 0.2-1 as MoCo v1, aspect 3/4-4/3, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p
0.2, CutMix area ~ U(0, 1)), gamma_init 1, border 0, and the k-means sample: 2,000,000 vectors
(100 per word), 10 random locations of each of 200,000 random training images (of 196 on
conv4, 49 on conv5), 50 Lloyd iterations from k-means++ seeds.

Memory of the vocabulary stage at K = 20,000 (`bow.build.kmeans_footprint`; float32): the
2,000,000 kept vectors are the only thing the streamed pass gathers on the host: 7.6 GiB
(conv4, 1024-d) / 15.3 GiB (conv5, 2048-d), preallocated once (`build.vector_buffer`; nothing
else per image stays). k-means: the vectors sharded over the devices (one GPU: 7.6 / 15.3 GiB;
8 GPUs: 0.97 / 1.9 GiB each), centroids 0.08 / 0.15 GiB per [K, C] array; one assignment step
scores chunk x K: the chunk is chosen from K automatically (`kmeans.default_chunk_size`: 2^27
floats per accelerator, 2^27 // 20,000 = 6,710 rows per device, a 0.50 GiB block; on CPU 128
rows, 10 MiB); k-means++ seeds from 640,000 vectors (2.4 / 4.9 GiB). XLA's compiled memory
analysis on one device (CPU compile of the same programs, GPU chunk): Lloyd iteration 1.3 / 1.5
GiB of temporaries besides the vectors, seeding 2.5 / 4.9 GiB, and the start of Lloyd (the
per-feature variance of the tolerance) a full-size temporary copy of the vectors (7.7 / 15.3
GiB): peak about 2x the vectors, 31 GiB on one H100 for conv5, 3.9 GiB per device on 8.

Evaluation (the chain scores every stage with this config's `eval` block; --config.task is
'bownet_chain'): `imagenet_probes` on the pooled 2048-d feature: linear probe (the OBoW official
augmented probe, 'imagenet_r50_obow'; the BoWNet paper's Table 5 probe follows Goyal et al.
2019: Nesterov SGD, 28 epochs, lr 0.01 x0.1 after 10 and 20, batch 256, wd 1e-4, a recipe not in
`protocols.linear.PROTOCOLS`), 50-way few-shot, 20-NN, and the k-NN monitor every epoch of every
stage. Paper (BowNet conv4): ImageNet linear 62.1% pool5. VOC07 classification (Table 4, 79.3
mAP on conv5 = 'layer4_pool2', linear SVMs of Goyal et al.) reads another dataset: score a
stage, e.g. round 2, with the evaluate task and configs/obow_resnet50_voc07.py's eval block:

    python -m bow_jax.main --config=configs/bownet_resnet50_imagenet.py --workdir=DIR
    python -m bow_jax.main --config=configs/bownet_resnet50_imagenet.py --workdir=DIR/bownet_2 \\
        --config.task=evaluate --config.bownet.teacher_workdir=DIR/bownet_1 \\
        --config.bownet.vocabulary=DIR/vocab_2/vocabulary.npz \\
        --config.eval.protocols="('voc07_svm',)" --config.eval.feature=layer4_pool2 \\
        --config.eval.image_size=224 --config.eval.resize_shorter=256 \\
        --config.eval.transform=resize_whole --config.eval.train_split=train+validation \\
        --config.eval.test_split=test --config.eval.fewshot_classes= \\
        --config.eval.data.source=tfds --config.eval.data.name=voc/2007 \\
        --config.eval.data.in_memory=False --config.eval.data.data_dir=VOC07_TFDS_DIR

Data: the prepared TFDS `imagenet2012` (in $TFDS_DATA_DIR or ~/tensorflow_datasets), streamed
(`config.data.in_memory=False`) by every stage: training views cut on the device from canvases,
the vocabulary's teacher views likewise (only the kept vectors reach the host), evaluation
features streamed and cached per stage under DIR/<stage>/eval/features.
"""
import os

from bow_jax.config import (base_config, bownet_chain, imagenet_probes, imagenet_setting,
                            schedule_of_checkpoints, sgd)

STEPS_PER_EPOCH = 1_281_167 // 256  # 5004


def get_config():
    c = imagenet_setting(base_config("bownet"), "resnet50", "imagenet2012")
    c.batch_size = 256
    c.num_epochs = 140
    sgd(c, 0.03, weight_decay=1e-4, schedule="step", milestones=(60, 100, 130))
    # About one epoch; every 10th epoch kept for good.
    schedule_of_checkpoints(c, STEPS_PER_EPOCH, keep_every=STEPS_PER_EPOCH * 10, log_every=100)
    bownet_chain(c, os.path.join(os.path.dirname(__file__), "rotnet_resnet50_imagenet.py"),
                 teacher_layer="layer3", num_words=20_000, target="binary", rounds=2,
                 view_size=224, teacher_resize=256, vocab_images=200_000,
                 vocab_max_vectors=2_000_000, kmeans_iters=50, eval_features=("pooled",))
    return imagenet_probes(c, "imagenet_r50_obow", monitor_every=STEPS_PER_EPOCH)
