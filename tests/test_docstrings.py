"""Config classes document every field in an ``Args:`` block (what the Hugging Face doc-builder reads), written from
the same ``help`` text the command line shows."""

import dataclasses

import pytest

from mmexperts import AltMoEConfig, MoPEConfig, S3Config
from mmexperts.training import TrainConfig
from mmexperts.training.sweep import SweepConfig

CONFIGS = [MoPEConfig, S3Config, AltMoEConfig, TrainConfig, SweepConfig]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_config_docstring_lists_every_own_field_with_its_help(config):
    doc = config.__doc__
    assert "\nArgs:\n" in doc
    args = doc.split("\nArgs:\n", 1)[1]
    inherited_from_peft = {f.name for f in dataclasses.fields(__import__("peft").PeftConfig)}
    for spec in dataclasses.fields(config):
        if spec.name in inherited_from_peft:
            assert f"    {spec.name} (" not in args  # documented by PEFT itself
            continue
        assert f"    {spec.name} (`" in args, spec.name
        first_words = " ".join(spec.metadata["help"].split()[:4])
        assert first_words in " ".join(args.split()), spec.name


def test_args_block_states_type_and_default():
    args = MoPEConfig.__doc__.split("\nArgs:\n", 1)[1]
    assert "    num_experts (`int`, defaults to `4`):" in args
    assert "    prompt_mode (`str`, defaults to `'tokens'`):" in args
    assert MoPEConfig.__doc__.startswith("Mixture of Prompt Experts")
