"""PEFT type registration (``mmexperts.registry``): our own str-enum types, written into PEFT's three mappings once
(registering again changes nothing), the checks that refuse a clash before anything is written, and PEFT resolving our
types in ``get_peft_model``, ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained``."""

from __future__ import annotations

import importlib
import json

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import mmexperts
from mmexperts import (
    AltMoEConfig,
    AltMoEModel,
    MMExpertsPeftType,
    MoPEConfig,
    MoPEModel,
    S3Config,
    S3Model,
    register_method,
)

from conftest import make_classifier, make_clip

MAPPINGS = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # PEFT reads a deprecated attribute
METHODS = {  # peft type: (config class, tuner class, prefix)
    MMExpertsPeftType.MOPE: (MoPEConfig, MoPEModel, "mope_"),
    MMExpertsPeftType.S3: (S3Config, S3Model, "s3_"),
    MMExpertsPeftType.ALTMOE: (AltMoEConfig, AltMoEModel, "altmoe_"),
}


def snapshot() -> list[dict]:
    """Copies of PEFT's config, tuner and prefix mappings."""
    return [dict(mapping) for mapping in MAPPINGS]


def free(monkeypatch, peft_type: MMExpertsPeftType) -> None:
    """Unregister ``peft_type`` for this test (monkeypatch puts the entries back afterwards)."""
    for mapping in MAPPINGS:
        monkeypatch.delitem(mapping, peft_type)


def test_peft_types_are_plain_strings_in_json_and_in_mapping_lookups():
    assert [t.value for t in MMExpertsPeftType] == ["MOPE", "S3", "ALTMOE"]
    assert not {t.value for t in MMExpertsPeftType} & {t.value for t in PeftType}  # no clash with PEFT's own
    for peft_type in MMExpertsPeftType:
        assert isinstance(peft_type, str) and peft_type == peft_type.value
        assert MMExpertsPeftType(peft_type.value) is peft_type
        assert json.loads(json.dumps({"peft_type": peft_type})) == {"peft_type": peft_type.value}
        # adapter_config.json holds the plain name, and PEFT looks its classes up with it
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type.value] is METHODS[peft_type][0]
        assert str(peft_type).partition(".")[-1] == peft_type.value  # what peft.get_model_status() reports


def test_importing_mmexperts_registers_each_method_with_its_config_tuner_and_prefix():
    for peft_type, (config_cls, model_cls, prefix) in METHODS.items():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix == model_cls.prefix
        assert config_cls().peft_type is peft_type
    ours = [key for key in PEFT_TYPE_TO_CONFIG_MAPPING if isinstance(key, MMExpertsPeftType)]
    assert sorted(ours) == sorted(MMExpertsPeftType)


def test_importing_or_registering_again_changes_nothing():
    before = snapshot()
    assert importlib.import_module("mmexperts") is mmexperts
    for _ in range(2):
        for peft_type, (config_cls, model_cls, prefix) in METHODS.items():
            assert register_method(peft_type, config_cls, model_cls, prefix) is None
    assert snapshot() == before


def test_a_freed_type_is_written_into_all_three_mappings(monkeypatch):
    free(monkeypatch, MMExpertsPeftType.S3)
    assert all(MMExpertsPeftType.S3 not in mapping for mapping in MAPPINGS)
    register_method(MMExpertsPeftType.S3, S3Config, S3Model, "s3_")
    assert PEFT_TYPE_TO_CONFIG_MAPPING["S3"] is S3Config and PEFT_TYPE_TO_TUNER_MAPPING["S3"] is S3Model
    assert PEFT_TYPE_TO_PREFIX_MAPPING["S3"] == "s3_"


def test_another_class_under_a_registered_type_is_refused_and_nothing_is_overwritten():
    class OtherConfig(MoPEConfig):
        pass

    before = snapshot()
    with pytest.raises(KeyError, match=r"PEFT type MOPE is already registered .*refusing to overwrite it with "
                                       r"\(OtherConfig, MoPEModel, 'mope_'\)"):
        register_method(MMExpertsPeftType.MOPE, OtherConfig, MoPEModel, "mope_")
    with pytest.raises(KeyError, match="already registered"):  # the same classes under another prefix
        register_method(MMExpertsPeftType.MOPE, MoPEConfig, type("NoPrefix", (), {}), "moe_")
    assert snapshot() == before


@pytest.mark.parametrize("prefix, owner", [("s3_", "S3"), ("lora_", "LORA")])
def test_a_prefix_another_type_uses_is_refused(monkeypatch, prefix, owner):
    free(monkeypatch, MMExpertsPeftType.MOPE)
    before = snapshot()
    with pytest.raises(KeyError, match=rf"Prefix '{prefix}' is already used by PEFT type .*{owner}"):
        register_method(MMExpertsPeftType.MOPE, MoPEConfig, type("Tuner", (), {}), prefix)
    assert snapshot() == before


@pytest.mark.parametrize("arguments, error, message", [
    ((PeftType.LORA, MoPEConfig, MoPEModel, "mope_"), TypeError, "must be an MMExpertsPeftType member"),
    (("MOPE", MoPEConfig, MoPEModel, "mope_"), TypeError, "must be an MMExpertsPeftType member, got 'MOPE'"),
    ((MMExpertsPeftType.MOPE, MoPEConfig, MoPEModel, "Mope_"), ValueError, "must be lower case and end with '_'"),
    ((MMExpertsPeftType.MOPE, MoPEConfig, MoPEModel, "mope"), ValueError, "must be lower case and end with '_'"),
    ((MMExpertsPeftType.MOPE, MoPEConfig, MoPEModel, "prompts_"), ValueError,
     "MoPEModel.prefix is 'mope_' but MOPE registers prefix 'prompts_'; they must be equal"),
])
def test_bad_arguments_are_refused_before_anything_is_written(monkeypatch, arguments, error, message):
    free(monkeypatch, MMExpertsPeftType.MOPE)
    before = snapshot()
    with pytest.raises(error, match=message):
        register_method(*arguments)
    assert snapshot() == before


@pytest.mark.parametrize("config, make_base", [
    (lambda: MoPEConfig(init_weights=False), make_classifier),
    (lambda: S3Config(num_experts=2, top_k=1, latent_size=8, init_weights=False), make_classifier),
    (lambda: AltMoEConfig(num_experts=2, top_k=1, hidden_size=8, init_weights=False), make_clip),
], ids=["mope", "s3", "altmoe"])
def test_peft_resolves_our_types_when_building_saving_and_loading(tmp_path, config, make_base):
    torch.manual_seed(0)
    config = config()
    model = peft.get_peft_model(make_base(), config)
    config_cls, model_cls, prefix = METHODS[config.peft_type]
    assert isinstance(model.base_model, model_cls)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == config.peft_type.value
    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is config_cls and loaded_config.peft_type is config.peft_type
    loaded = PeftModel.from_pretrained(make_base(), tmp_path)
    assert isinstance(loaded.base_model, model_cls)
    saved, restored = peft.get_peft_model_state_dict(model), peft.get_peft_model_state_dict(loaded)
    assert saved.keys() == restored.keys() and any(prefix in key for key in saved)
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
