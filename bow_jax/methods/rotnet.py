"""RotNet (Gidaris et al., ICLR 2018): predict which of the 4 rotations was applied.

Every image of the batch is shown in all 4 rotations (0, 90, 180, 270 degrees, exact rot90) in the
same batch, so a batch of B images is a forward pass over 4B inputs with labels 0..3; the learning
rate is not rescaled for the 4x batch (as in the official code). BatchNorm statistics are taken
over all 4B inputs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bow_jax.data import augment
from bow_jax.lib.state import TrainState
from bow_jax.methods import common
from bow_jax.models import heads


class ResidualHeadBlock(nn.Module):
    """A pre-activation residual block on the last feature map: the BoWNet paper's RotNet head
    ("an extra residual block instead of just a linear layer")."""

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                         epsilon=1e-5, name=name)
        conv = lambda name: nn.Conv(channels, (3, 3), padding=1, use_bias=False, name=name,
                                    kernel_init=nn.initializers.variance_scaling(
                                        2.0, "fan_out", "normal"))
        h = conv("conv1")(nn.relu(norm("bn1")(x)))
        h = conv("conv2")(nn.relu(norm("bn2")(h)))
        return nn.relu(norm("bn_out")(x + h))


class RotNetModel(nn.Module):
    """Backbone plus rotation classifier; returns (rotation logits [N,4], backbone outputs)."""
    backbone: nn.Module
    head: str = "linear"  # 'linear': on the backbone's pooled vector; 'residual': block + pool
    head_feature: str = "pooled"

    @nn.compact
    def __call__(self, x, train: bool):
        features = self.backbone(x, train=train)
        if self.head == "residual":
            z = jnp.mean(ResidualHeadBlock(name="head_block")(features[self.head_feature], train),
                         axis=(1, 2))
        else:
            z = features["pooled"]
        return heads.RotationHead(name="rotation_head")(z), features


def default_config() -> ml_collections.ConfigDict:
    """config.rotnet."""
    r = ml_collections.ConfigDict()
    r.head = "linear"  # 'linear' on the pooled vector, or 'residual' (BoWNet paper's RotNet)
    r.head_feature = "pooled"  # input map of the residual head
    r.crop_size = 0  # 0: the stored image size
    r.crop_padding = 4  # CIFAR: RandomCrop(32, padding=4)
    r.flip = True
    return r


def backbone_variables(state):
    """The backbone's part of the variables (what evaluation and export use)."""
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}


def create(config, data_info: common.DataInfo) -> common.Method:
    cfg = config.rotnet
    if cfg.head not in ("linear", "residual"):
        raise ValueError(f"config.rotnet.head={cfg.head!r}; expected 'linear' or 'residual'.")
    backbone = common.backbone_from_config(config)
    model = RotNetModel(backbone=backbone, head=cfg.head, head_feature=cfg.head_feature,
                        name=None)
    tx, lr_schedule = common.optimizer_from_config(config, data_info)
    mean, std = common.normalization(config)
    height, width, _ = data_info.image_shape
    crop = cfg.crop_size or height

    def init_state(key):
        init_key, state_key = jax.random.split(key)
        dummy = jnp.zeros((1, crop, crop, 3), jnp.float32)
        variables = model.init({"params": init_key}, dummy, train=False)
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          opt_state=tx.init(variables["params"]), rng=state_key)

    def make_views(images, key):
        """The split's geometric augmentation (CIFAR: RandomCrop(pad 4) + flip), uint8."""
        keys = jax.random.split(key, images.shape[0])

        def one(k, image):
            crop_key, flip_key = jax.random.split(k)
            if cfg.crop_padding or crop != height:
                image = augment.random_crop_with_padding(crop_key, image, crop, cfg.crop_padding)
            if cfg.flip:
                image = augment.random_flip(flip_key, image)
            return image

        return {"image": jax.vmap(one)(keys, images).astype(jnp.uint8)}

    def train_step(state, batch):
        inputs, labels = augment.rotate4(common.to_network_input(batch["image"], mean, std))

        def loss_fn(params):
            (logits, _), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                mutable=["batch_stats"])
            return common.cross_entropy(logits, labels), (updates["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        metrics = {"loss": loss,
                   "rotation_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
                   "lr": lr_schedule(state.step)}
        return state.apply_gradients(grads, tx, batch_stats=batch_stats), metrics

    def encode(state, images):
        return common.encode_with(backbone, backbone_variables(state), images,
                                  config.eval.feature, mean, std)

    def pretext_scores(state, images):
        """Rotation accuracy per image (mean over its 4 rotations), eval-mode BatchNorm."""
        inputs, labels = augment.rotate4(common.to_network_input(images, mean, std))
        logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                inputs, train=False)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {"rotation_accuracy": correct.reshape(-1, 4).mean(axis=1)}

    return common.Method(init_state=init_state, train_step=train_step, make_views=make_views,
                         encode=encode, pretext_scores=pretext_scores)
