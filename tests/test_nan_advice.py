"""The advice of a diverging run names the fields the user sets: in the BoWNet chain a stage's
config is derived (`bownet_chain.rotnet_config`, `bownet_config`), so the RotNet stage's lr is
config.bownet.rotnet.optim.lr, not the chain's own config.optim.lr, and the stage is named."""
import pytest

from bow_jax import pretrain
from bow_jax.lib import checkpoint
from bow_jax.tasks import bownet_chain
from test_bownet import tiny_chain_config  # tests/ is on sys.path (pytest's rootdir import mode)


def test_each_chain_stage_names_its_own_fields(tmp_path):
    config = tiny_chain_config(**{"bownet.rotnet.model.kwargs.dtype": "bfloat16"})
    rotnet = bownet_chain.rotnet_config(config)
    bownet = bownet_chain.bownet_config(config, 1, str(tmp_path))
    assert bownet_chain.stage_field(rotnet) == "config.bownet.rotnet"
    assert bownet_chain.stage_field(bownet) == "config"
    advice = pretrain.likely_causes(rotnet,
                                    pretrain.Stage("rotnet", bownet_chain.stage_field(rotnet)))
    assert advice.startswith(f"In the BoWNet chain's 'rotnet' stage: likely causes: "
                             f"config.bownet.rotnet.optim.lr={rotnet.optim.lr} too high (lower "
                             f"it, or lengthen config.bownet.rotnet.optim.warmup_epochs); "
                             f"config.bownet.rotnet.model.kwargs.dtype=bfloat16")
    advice = pretrain.likely_causes(bownet,
                                    pretrain.Stage("bownet_1", bownet_chain.stage_field(bownet)))
    assert advice.startswith(f"In the BoWNet chain's 'bownet_1' stage: likely causes: "
                             f"config.optim.lr={config.optim.lr} too high")
    # Outside the chain: the run's own config, no stage.
    assert pretrain.likely_causes(config).startswith(f"Likely causes: config.optim.lr="
                                                     f"{config.optim.lr} too high")


def test_a_diverging_rotnet_stage_names_config_bownet_rotnet_optim_lr(tmp_path):
    """A fresh user's repro: --config.bownet.rotnet.optim.lr=1e30 was advised to lower
    config.optim.lr=... (the chain's BoWNet lr, 0.03 in the paper's recipe), stage unnamed."""
    config = tiny_chain_config(**{"bownet.rotnet.optim.lr": 1e30})
    with pytest.raises(checkpoint.NonFiniteError) as raised:
        bownet_chain.run(config, str(tmp_path / "chain"))
    message = str(raised.value)
    assert ("In the BoWNet chain's 'rotnet' stage: likely causes: config.bownet.rotnet.optim.lr="
            "1e+30 too high (lower it, or lengthen config.bownet.rotnet.optim.warmup_epochs)"
            in message), message
    assert "config.optim.lr" not in message and "None" not in message, message
