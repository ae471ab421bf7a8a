"""Composition of conf/ and the checks that stop impossible settings before any training."""

import pytest
from hydra.errors import ConfigCompositionException

from fedgen.config import ConfigError, ExperimentConfig, load_config


def test_default_composes_to_typed_config():
    cfg = load_config([])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.federation.num_hospitals == 3 and cfg.privacy.enabled
    assert load_config(["privacy=eps1", "federation.num_hospitals=5"]).privacy.target_epsilon == 1.0
    assert load_config(["privacy=none"]).privacy.enabled is False


@pytest.mark.parametrize(
    "override,setting",
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-3", "privacy.target_epsilon"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("data.image_size=30", "data.image_size"),
        ("training.noise_multiplicity=0", "training.noise_multiplicity"),
        ("federation.num_rounds=0", "federation.num_rounds"),
        ("federation.partitioning=random", "federation.partitioning"),
        ("data.heldout_fraction=0.95", "data.heldout_fraction"),
        ("model.norm_num_groups=5", "model.norm_num_groups"),
        ("federation.sampling_method=euler", "federation.sampling_method"),
        ("federation.sampling_steps=0", "federation.sampling_steps"),
        ("training.timestep_range=[500,100]", "training.timestep_range"),
        ("training.lr_schedule=linear", "training.lr_schedule"),
        ("training.timestep_range=[0,1001]", "training.timestep_range"),
    ],
)
def test_impossible_settings_fail_naming_the_setting(override, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        load_config([override])


def test_wrong_type_or_unknown_key_fails_at_composition():
    with pytest.raises(ConfigError, match="federation.num_hospitals=many") as caught:
        load_config(["federation.num_hospitals=many"])
    assert isinstance(caught.value.__cause__, ConfigCompositionException)  # Hydra's, in one line
    # Hydra suggests `+key` for an unknown key, which it then composes and the schema drops.
    for typo in ("federation.num_hospital=3", "+federation.num_hospital=3", "++federation.num_hospital=3"):
        with pytest.raises(ConfigError, match=r"did you mean federation\.num_hospitals\?"):
            load_config([typo])
    assert load_config(["model.block_out_channels.0=8"]).model.block_out_channels[0] == 8  # a list item


def test_a_privacy_preset_that_a_later_preset_undoes_is_refused():
    # experiment=leak turns DP off after the privacy group: "privacy=eps1" would train without DP.
    for preset in ("leak", "leak_dp"):
        with pytest.raises(ConfigError, match="does not train with privacy=eps1.*experiment=leak_data"):
            load_config([f"experiment={preset}", "privacy=eps1"])
    twin = load_config(["experiment=leak_data", "privacy=eps1"])
    leak = load_config(["experiment=leak"])
    assert (twin.privacy.enabled, twin.privacy.target_epsilon) == (True, 1.0)
    assert (twin.data, twin.training, twin.federation) == (leak.data, leak.training, leak.federation)
    # An explicit key override is the user's own word.
    assert load_config(["privacy=eps1", "privacy.target_epsilon=2"]).privacy.target_epsilon == 2.0
