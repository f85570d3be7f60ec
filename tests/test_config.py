"""ldm/config.py: the one YAML loader (one error policy) and the checks that every config key means something."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from paths import REPO
from ldm.config import ConfigError, accepted_keys, check_target_params, load_configs, load_model_config
from ldm.train.cli import load_configs as cli_load_configs

SHAPES = str(REPO / "configs" / "shapes" / "shapes-ldm-finetune.yaml")
PERS = "model.params.personalization_config.params"


def test_the_train_cli_path_still_works():
    assert cli_load_configs is load_configs


@pytest.mark.parametrize(
    "override, needles",
    [
        (f"{PERS}.num_vector_per_token=4", ["EmbeddingManager", "'num_vector_per_token'", "did you mean 'num_vectors_per_token'"]),
        ("lightning.trainer.max_step=3", ["Trainer", "did you mean 'max_steps'"]),
        ("data.params.batchsize=2", ["DataModuleFromConfig", "did you mean 'batch_size'"]),
        ("model.base_learnin_rate=1", ["no key 'base_learnin_rate' under model", "did you mean 'base_learning_rate'"]),
        ("modle.params.foo=1", ["no key 'modle' under the top level", "did you mean 'model'"]),
        ("model.params.first_stage_config.params.factr=4", ["SpaceToDepthFirstStage", "did you mean 'factor'"]),
        ("lightning.callbacks.image_logger.params.batch_frequncy=5", ["ImageLogger", "did you mean 'batch_frequency'"]),
    ],
)
def test_a_mistyped_override_names_the_key_and_the_closest(override, needles):
    with pytest.raises(ConfigError) as err:
        load_configs([SHAPES], [override])
    assert all(n in str(err.value) for n in needles) and str(err.value).startswith(f"config override '{override}'")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, key, value",
    [
        (f"{PERS}.num_vectors_per_token=4", f"{PERS}.num_vectors_per_token", 4),
        ("model.params.gradient_checkpointing=true", "model.params.gradient_checkpointing", True),  # a parameter not in the file
        ("lightning.trainer.max_epochs=2", "lightning.trainer.max_epochs", 2),
        ("data.params.validation.target=ldm.data.personalized.PersonalizedBase", "data.params.validation.target", "ldm.data.personalized.PersonalizedBase"),
        ("model.params.unet_config.params.channel_mult=[1,2]", "model.params.unet_config.params.channel_mult", [1, 2]),
        # a new callback: lightning.callbacks holds names the user chooses
        ("lightning.callbacks.det.target=ldm.train.validation.DeterministicLoss", "lightning.callbacks.det.target", "ldm.train.validation.DeterministicLoss"),
    ],
)
def test_existing_keys_and_parameters_the_class_takes_are_accepted(override, key, value):
    config = load_configs([SHAPES], [override])
    got = OmegaConf.select(config, key)
    assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value


def test_an_unknown_param_in_a_config_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  params:\n    personalization_config:\n      params:\n        num_vector_per_token: 4\n")
    config = load_configs([SHAPES, str(bad)], [])
    with pytest.raises(ConfigError, match=rf"{PERS}.num_vector_per_token is not a parameter of EmbeddingManager.*num_vectors_per_token"):
        check_target_params(config)


def test_every_shipped_config_passes_the_key_check():
    for path in sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml")):
        check_target_params(load_configs([str(path)], []))


def test_which_keys_a_class_takes():
    assert accepted_keys("ldm.models.autoencoder.VQModel") is None  # **unused_training_kwargs: any key, on purpose
    manager = accepted_keys("ldm.modules.embedding_manager.EmbeddingManager")  # **kwargs goes to nn.Module: none
    assert "num_vectors_per_token" in manager and "embedding_manager_ckpt" in manager and "num_vector_per_token" not in manager
    assert {"ckpt_path", "ignore_keys", "linear_start", "cond_stage_config"} <= accepted_keys("ldm.models.diffusion.ddpm.LatentDiffusion")
    assert accepted_keys("no.such.Module") is None


@pytest.mark.parametrize(
    "content, needle",
    [(None, "does not exist"), ("a: [unclosed", "is not a readable YAML config"), ("- a\n- b\n", "not a mapping")],
)
def test_one_error_policy_for_files(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    for load in (lambda: load_configs([str(path)], [], flag="--base"), lambda: load_model_config(path)):
        with pytest.raises(ConfigError, match=needle) as err:
            load()
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    data_only = tmp_path / "data.yaml"
    data_only.write_text("data:\n  target: main.DataModuleFromConfig\n")
    with pytest.raises(ConfigError, match="has no 'model' section"):
        load_model_config(data_only)
