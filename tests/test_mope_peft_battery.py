"""PEFT-conformance battery for MoPE, replicating PEFT's generic tests (rows 1-29, 31, 33 of the table in
``shared/research/peft.md`` §3.2) on tiny two-tower models: ``VisionTextModelForClassification`` (with its head in
``modules_to_save``), ``VisionTextDualEncoderModel`` and, where cheap, ``CLIPModel``.

Merge rows (20, 22) are skipped because MoPE prompts are input-dependent; instead the merge entry points are checked
to raise a clear ``NotImplementedError`` without touching the model. Method-specific additions: router determinism in
``eval()``, padding invariance, and forward hooks being cleaned up after every call.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re
import warnings

import peft
import pytest
import torch
import yaml
from conftest import make_batch, make_classifier, make_clip, make_dual_encoder
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn

from mmexperts import MMExpertsPeftType, MoPEConfig, MoPELayer, MoPEModel, VisionTextModelForClassification

FACTORIES = {"classifier": make_classifier, "dual_encoder": make_dual_encoder, "clip": make_clip}
ALL_KINDS = list(FACTORIES)
TWO_KINDS = ["classifier", "dual_encoder"]
PREFIX = MoPEModel.prefix


# ----------------------------------------------------------------------------------------------------------- helpers


def inputs_for(kind: str, seed: int = 0, train: bool = False) -> dict:
    """A padded batch for ``kind``; dual encoders get no labels (and ``return_loss=True`` for training)."""
    batch = make_batch(seed=seed)
    if kind != "classifier":
        batch.pop("labels")
        if train:
            batch["return_loss"] = True
    return batch


def make_mope(kind: str, seed: int = 0, adapter_name: str = "default", autocast_adapter_dtype: bool = True,
              base: nn.Module | None = None, **config_kwargs) -> PeftModel:
    """Base model of ``kind`` wrapped with a MoPE adapter (random gates unless ``init_weights`` is given)."""
    base = FACTORIES[kind]() if base is None else base
    torch.manual_seed(seed)
    config = MoPEConfig(**{"init_weights": False, **config_kwargs})
    return get_peft_model(base, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def outputs(out) -> dict[str, torch.Tensor]:
    """The tensors of a model output that must match between two equivalent models."""
    keys = ("logits",) if "logits" in out else ("logits_per_image", "text_embeds", "image_embeds")
    return {key: out[key] for key in keys if out.get(key) is not None}


@torch.no_grad()
def run(model: nn.Module, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in outputs(model(**inputs_for(kind, seed))).items()}


def assert_same(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def assert_differ(a: dict, b: dict, atol: float = 1e-5):
    main = next(iter(a))
    assert not torch.allclose(a[main], b[main], atol=atol), f"{main} unexpectedly unchanged"


def train_steps(model: PeftModel, kind: str, steps: int = 3, lr: float = 0.5) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model(**inputs_for(kind, seed=step, train=True)).loss.backward()
        optimizer.step()
    model.eval()


def is_adapter_param(name: str) -> bool:
    return PREFIX in name or ".modules_to_save." in name


def params_of(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Adapter (and modules_to_save) parameters of one adapter, by name."""
    pattern = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    return {n: p for n, p in model.named_parameters() if is_adapter_param(n) and pattern.search(n)}


def state_dicts_equal(a: nn.Module, b: nn.Module):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys(), set(sd_a) ^ set(sd_b)
    unequal = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
    assert not unequal, f"state dict entries differ: {unequal}"


def hook_snapshot(model: nn.Module) -> dict:
    """Every hook and instance-level ``forward`` override in the model (the things a forward call may leave behind)."""
    snap = {}
    for name, module in model.named_modules():
        snap[name] = (tuple(module._forward_hooks), tuple(module._forward_pre_hooks), tuple(module._backward_hooks),
                      tuple(getattr(module, "_backward_pre_hooks", {})), "forward" in module.__dict__)
    return snap


def containers(value, label: str, depth: int = 0):
    """(label, container) for the dict-like (and str list-like) containers reachable from an attribute value, one
    dataclass level deep (per-call state records are dataclasses of dicts)."""
    if isinstance(value, (dict, nn.ModuleDict, nn.ParameterDict)) or type(value).__name__ == "BufferDict":
        yield label, value
    elif isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        yield label, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type) and depth == 0:
        for f in dataclasses.fields(value):
            yield from containers(getattr(value, f.name), f"{label}.{f.name}", depth + 1)


def leftovers(model: nn.Module, adapter: str) -> list[str]:
    """Attributes of any module of ``model`` (tuner included) whose dict/list still holds ``adapter``."""
    found = []
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            for label, container in containers(value, attr):
                if adapter in container:
                    found.append(f"{mod_name or '<root>'}.{label}")
    return found


# ------------------------------------------------------------------------------------------------------ rows 1 and 2


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_model_attr(kind):
    model = make_mope(kind)
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, attr)
    assert isinstance(model.base_model, MoPEModel)
    assert model.peft_config["default"].peft_type == MMExpertsPeftType.MOPE
    layers = [m for m in model.modules() if isinstance(m, MoPELayer)]
    assert len(layers) == 4  # 2 routed blocks + 2 deep blocks of the complementary tower


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_adapter_name(kind):
    model = make_mope(kind, adapter_name="test-adapter")
    names = [n for n, _ in model.named_parameters()]
    assert any("test-adapter" in n for n in names)
    # every adapter parameter is keyed by the adapter name, and nothing is still keyed "default"
    adapter_names = [n for n in names if is_adapter_param(n)]
    assert adapter_names and all(".test-adapter" in n for n in adapter_names)
    assert not any(".default" in n for n in names)
    assert model.active_adapters == ["test-adapter"]


# ---------------------------------------------------------------------------------------- rows 3, 11, 12, 13: saving


def check_modelcard_and_config(directory: str, base: nn.Module):
    with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    card = yaml.safe_load(re.search(r"---\n(.*?)\n---", readme, re.DOTALL).group(1))
    assert card["library_name"] == "peft"
    raw_name = base.config.to_dict().get("_name_or_path")  # PEFT's check_modelcard logic
    if raw_name is not None:
        assert card["base_model"] == raw_name
    else:
        assert "base_model" not in card
    name_or_path = raw_name or None
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "MOPE"
    assert config["base_model_name_or_path"] == name_or_path
    return config


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_pretrained_roundtrip(kind, safe, tmp_path):
    base_outputs = run(FACTORIES[kind]().eval(), kind)
    model = make_mope(kind)
    train_steps(model, kind, steps=1)  # row 12: trained parameters round-trip, not just the init
    before = run(model, kind)
    assert_differ(before, base_outputs)  # row 11: a random-gate adapter changes the output
    with torch.no_grad():
        loss_before = model(**inputs_for(kind, train=True)).loss

    model.save_pretrained(tmp_path, safe_serialization=safe)
    files = set(os.listdir(tmp_path))
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert {"adapter_config.json", weights} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & files
    assert ("adapter_model.bin" if safe else "adapter_model.safetensors") not in files
    config = check_modelcard_and_config(str(tmp_path), model.get_base_model())
    assert config["prompted_tower"] == "vision" and config["init_weights"] is False

    saved = load_file(tmp_path / weights) if safe else torch.load(tmp_path / weights, weights_only=True)
    assert len(saved) == len(get_peft_model_state_dict(model))
    assert all(PREFIX in k or "classifier" in k for k in saved), "base weights leaked into the adapter file"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path)
    assert not [w for w in caught if "Found missing adapter keys" in str(w.message)]
    assert isinstance(loaded.base_model, MoPEModel)
    assert isinstance(loaded.peft_config["default"], MoPEConfig)
    state_dicts_equal(model, loaded)
    assert_same(run(loaded.eval(), kind), before)  # row 13
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs_for(kind, train=True)).loss, loss_before)


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_save_pretrained_selected_adapters(kind, tmp_path):
    model = make_mope(kind)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.eval()
    out_default = run(model, kind)
    model.set_adapter("other")
    out_other = run(model, kind)
    assert_differ(out_default, out_other)

    model.save_pretrained(tmp_path / "all")
    assert os.path.exists(tmp_path / "all" / "adapter_model.safetensors")
    assert os.path.exists(tmp_path / "all" / "other" / "adapter_model.safetensors")
    assert os.path.exists(tmp_path / "all" / "other" / "adapter_config.json")

    loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path / "all")
    result = loaded.load_adapter(tmp_path / "all" / "other", adapter_name="other")
    assert result.missing_keys == []
    state_dicts_equal(model, loaded)
    loaded.eval()
    assert_same(run(loaded, kind), out_default)
    loaded.set_adapter("other")
    assert_same(run(loaded, kind), out_other)

    model.save_pretrained(tmp_path / "selected", selected_adapters=["default"])
    assert os.path.exists(tmp_path / "selected" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "selected" / "other")


def test_save_pretrained_adapter_name_substring(tmp_path):
    model = make_mope("classifier")
    for i, name in enumerate(["default2", "other_default", "foodefault_bar", "efaul"]):
        torch.manual_seed(i + 1)
        model.add_adapter(name, MoPEConfig(init_weights=False))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model, adapter_name="default")
    assert len(saved) == len(expected)
    assert saved.keys() == expected.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key], atol=0, rtol=0)
    assert not any(other in key for key in saved for other in ("default2", "other_default", "foodefault_bar"))
    # the checkpoint holds exactly the "default" adapter's values
    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path)
    reference = params_of(model, "default")
    loaded_params = params_of(loaded, "default")
    assert reference.keys() == loaded_params.keys()
    assert all(torch.equal(reference[n], loaded_params[n]) for n in reference)


# --------------------------------------------------------------------------------------------------- rows 6, 7, 8, 24


def test_from_pretrained_config_construction(tmp_path):
    config = MoPEConfig(init_weights=False)
    model = get_peft_model(make_classifier(), config)
    model.save_pretrained(tmp_path)
    assert config.inference_mode is False
    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config
    assert loaded.peft_config["default"].inference_mode
    state_dicts_equal(model, loaded)


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_load_multiple_adapters(kind, tmp_path):
    model = make_mope(kind)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path)
    result1 = loaded.load_adapter(tmp_path, adapter_name="other")
    result2 = loaded.load_adapter(tmp_path, adapter_name="yet-another")
    assert result1.missing_keys == []
    assert result2.missing_keys == []
    # the same checkpoint under another name gives the same parameters and the same outputs
    reference = {n.replace(".default", ""): p for n, p in params_of(loaded, "default").items()}
    other = {n.replace(".other", ""): p for n, p in params_of(loaded, "other").items()}
    assert reference.keys() == other.keys()
    assert [n for n in reference if not torch.equal(reference[n], other[n])] == []
    loaded.eval()
    out_default = run(loaded, kind)
    loaded.set_adapter("other")
    assert_same(run(loaded, kind), out_default)


def test_load_model_low_cpu_mem_usage(tmp_path):
    model = make_mope("classifier")
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    state_dicts_equal(model, loaded)

    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert params_of(loaded, "other")

    injected = peft.inject_adapter_in_model(MoPEConfig(init_weights=False), make_classifier(), low_cpu_mem_usage=True)
    meta = [n for n, p in injected.named_parameters() if p.device.type == "meta"]
    assert meta and all(PREFIX in n for n in meta)


def test_peft_model_device_map(tmp_path):
    model = make_mope("classifier").eval()
    expected = run(model, "classifier")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path, device_map={"": "cpu"})
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert_same(run(loaded.eval(), "classifier"), expected)


# ---------------------------------------------------------------------------------------------- rows 9, 10: training


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_training_grads_only_on_adapter(kind):
    model = make_mope(kind)
    model.train()
    out = model(**inputs_for(kind, train=True))
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert is_adapter_param(name), f"base parameter {name} is trainable"
            assert param.grad is not None, f"trainable {name} got no grad"
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a grad"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params_of(model, "default"))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_only_params_are_updated(kind):
    model = make_mope(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, kind, steps=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.allclose(before[name], param, atol=1e-6), f"trainable {name} did not change"
        else:
            assert torch.equal(before[name], param), f"base parameter {name} changed"
    # buffers (e.g. the frozen routing keys) never change
    model2 = make_mope(kind)
    assert all(torch.equal(b1, b2) for (_, b1), (_, b2) in zip(model.named_buffers(), model2.named_buffers()))


# --------------------------------------------------------------------------------------- rows 14, 15: disable_adapter


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_disable_adapters(kind):
    base_outputs = run(FACTORIES[kind]().eval(), kind)
    model = make_mope(kind, init_weights=True, prompt_mode="prefix").eval()
    initial = run(model, kind)
    assert_same(initial, base_outputs, atol=0)  # zero-init gates: an exact identity
    if kind == "classifier":  # the loss is the base loss plus the weighted importance loss of the routers
        batch = inputs_for(kind)
        with torch.no_grad():
            base_loss, out = FACTORIES[kind]()(**batch).loss, model(**batch)
        torch.testing.assert_close(out.loss, base_loss + 0.01 * out.aux_loss)

    train_steps(model, kind, steps=3)
    trained = run(model, kind)
    assert_differ(trained, base_outputs)
    with model.disable_adapter():
        assert_same(run(model, kind), base_outputs)
    assert_same(run(model, kind), trained, atol=0)


def test_disable_adapters_exiting_context_restores_previous_state():
    model = make_mope("classifier").eval()
    base_outputs = run(make_classifier(), "classifier")
    adapted = run(model, "classifier")
    model.base_model.disable_adapter_layers()
    assert_same(run(model, "classifier"), base_outputs)
    with model.disable_adapter():
        assert_same(run(model, "classifier"), base_outputs)
    assert peft.get_model_status(model).enabled is False  # still disabled, as before the context
    assert_same(run(model, "classifier"), base_outputs)
    model.base_model.enable_adapter_layers()
    assert_same(run(model, "classifier"), adapted)


def test_disable_adapters_exiting_context_irregular_state():
    model = make_mope("classifier").eval()
    adapted = run(model, "classifier")
    layer = next(m for m in model.modules() if isinstance(m, MoPELayer))
    layer.enable_adapters(False)
    assert peft.get_model_status(model).enabled == "irregular"
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert peft.get_model_status(model).enabled is True
    assert_same(run(model, "classifier"), adapted)


# ------------------------------------------------------------------------------------------------ row 16: set_adapter


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_active_adapter(kind):
    model = make_mope(kind).eval()
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    out_default = run(model, kind)
    torch.manual_seed(1)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    assert_same(run(model, kind), out_default, atol=0)

    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    out_other = run(model, kind)
    assert_differ(out_default, out_other)
    model.set_adapter("default")
    assert_same(run(model, kind), out_default, atol=0)


@pytest.mark.parametrize("kind", ["dual_encoder", "clip"])
def test_multiple_active_adapters(kind):
    """Both adapters' prompts join the blocks; routing weights come back per adapter. (Not for the classifier:
    PEFT's ModulesToSaveWrapper allows one active adapter only.)"""
    model = make_mope(kind).eval()
    out_default = run(model, kind)
    torch.manual_seed(1)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.set_adapter("other")
    out_other = run(model, kind)
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]
    with torch.no_grad():
        out = model(**inputs_for(kind))
    both = outputs(out)
    assert_differ(both, out_default)
    assert_differ(both, out_other)
    assert isinstance(out.routing_weights, dict) and set(out.routing_weights) == {"default", "other"}
    assert all(w.shape == (2, 4, 4) for w in out.routing_weights.values())


# ----------------------------------------------------------------------------------------------- row 17: requires_grad


def trainability(model: nn.Module) -> dict[str, set[bool]]:
    result = {"base": set()}
    for name, param in model.named_parameters():
        if not is_adapter_param(name):
            result["base"].add(param.requires_grad)
            continue
        adapter = "default" if re.search(r"\.default(\.|$)", name) else "other"
        result.setdefault(adapter, set()).add(param.requires_grad)
    return result


def test_set_requires_grad():
    model = make_mope("classifier")
    model.add_adapter("other", MoPEConfig(init_weights=False))
    assert trainability(model) == {"base": {False}, "default": {True}, "other": {False}}
    model.set_requires_grad("other", requires_grad=True)
    assert trainability(model) == {"base": {False}, "default": {True}, "other": {True}}
    model.set_requires_grad("default", requires_grad=False)
    assert trainability(model) == {"base": {False}, "default": {False}, "other": {True}}


def test_set_adapter_requires_grad_and_inference_mode():
    model = make_mope("classifier")
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.set_adapter("other")
    assert trainability(model) == {"base": {False}, "default": {False}, "other": {True}}
    model.set_adapter("default", inference_mode=True)
    assert trainability(model) == {"base": {False}, "default": {False}, "other": {False}}

    frozen = make_mope("classifier", inference_mode=True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_loading_model_requires_grad_set_correctly(tmp_path):
    make_mope("classifier").save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path)  # is_trainable=False
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.peft_config["default"].inference_mode is True

    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path, is_trainable=True)
    assert trainability(loaded) == {"base": {False}, "default": {True}}
    assert loaded.peft_config["default"].inference_mode is False

    # loading or adding a second adapter never changes the trainability of the first
    loaded.load_adapter(tmp_path, adapter_name="other")  # is_trainable=False
    assert trainability(loaded) == {"base": {False}, "default": {True}, "other": {False}}
    loaded.delete_adapter("other")
    loaded.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert trainability(loaded) == {"base": {False}, "default": {True}, "other": {True}}
    loaded.delete_adapter("other")
    loaded.add_adapter("other", MoPEConfig(init_weights=False))
    assert trainability(loaded) == {"base": {False}, "default": {True}, "other": {False}}


def test_loading_model_requires_grad_switch_inference_mode(tmp_path):
    make_mope("classifier").save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.set_requires_grad("default", requires_grad=True)
    assert trainability(loaded) == {"base": {False}, "default": {True}}
    loaded.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in loaded.parameters())


# ---------------------------------------------------------------------------------------------- rows 18, 19: deletion


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_delete_adapter(kind):
    model = make_mope(kind).eval()
    out_default = run(model, kind)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.set_adapter("other")
    run(model, kind)  # "other" takes part in a forward call before it is deleted
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names + module.other_param_names:
                assert "other" not in getattr(module, attr), attr
    assert_same(run(model, kind), out_default, atol=0)


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_delete_inactive_adapter(kind):
    model = make_mope(kind).eval()
    out_default = run(model, kind)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
    assert not params_of(model, "other")
    assert_same(run(model, kind), out_default, atol=0)


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_delete_last_adapter(kind):
    base_outputs = run(FACTORIES[kind]().eval(), kind)
    model = make_mope(kind).eval()
    model.delete_adapter("default")
    assert model.active_adapters == []
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model.base_model(**inputs_for(kind))
    assert_same(outputs(out), base_outputs)


def test_delete_unknown_adapter_raises():
    model = make_mope("classifier")
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_delete_adapter_properly_cleans_up_after_itself(kind):
    model = make_mope(kind)
    model.add_adapter("other", MoPEConfig(init_weights=False))
    model.set_adapter("other")
    model.train()
    model(**inputs_for(kind, train=True)).loss.backward()  # "other" leaves its traces in every per-call record
    model.set_adapter("default")
    model.delete_adapter("other")
    assert leftovers(model, "default"), "sanity check: the scan must see the live adapter"
    assert leftovers(model, "other") == []


# -------------------------------------------------------------------------------------- rows 20, 22: merging refused


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_merge_is_refused_clearly_and_harmlessly(kind):
    model = make_mope(kind).eval()
    expected = run(model, kind)
    tuner_layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.base_model.merge_and_unload(safe_merge=True)
    assert [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)] == tuner_layers
    assert peft.get_model_status(model).merged_adapters == []
    assert_same(run(model, kind), expected, atol=0)


# ----------------------------------------------------------------------------------------------------- row 21: unload


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unload_adapter(kind):
    reference = FACTORIES[kind]().eval()
    base_outputs = run(reference, kind)
    model = make_mope(kind).eval()
    assert_differ(run(model, kind), base_outputs)
    unloaded = model.unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    assert unloaded.state_dict().keys() == reference.state_dict().keys()
    assert hook_snapshot(unloaded) == hook_snapshot(reference)  # the prefix-attention hooks are gone too
    assert_same(run(unloaded, kind), base_outputs)


# ------------------------------------------------------------------------------------- row 23: gradient checkpointing


def grads_with_checkpointing(kind: str, level: str | None) -> dict[str, torch.Tensor]:
    model = make_mope(kind, prompt_dropout=0.0, router_noise_std=0.0)
    inner = model.base_model.model
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if level == "towers":
        inner.vision_model.gradient_checkpointing_enable(**kwargs)
        inner.text_model.gradient_checkpointing_enable(**kwargs)
    elif level == "model":
        inner.gradient_checkpointing_enable(**kwargs)
    model.train()
    calls = []
    attention = next(m for m in model.modules() if isinstance(m, MoPELayer))._prefix.anatomy.query
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    model(**inputs_for(kind, train=True)).loss.backward()
    handle.remove()
    # with checkpointing, the block's attention runs again in the backward pass
    assert len(calls) == (1 if level is None else 2)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("kind,level", [("classifier", "towers"), ("classifier", "model"),
                                        ("dual_encoder", "towers"), ("clip", "towers")])
def test_training_gradient_checkpointing(kind, level):
    reference = grads_with_checkpointing(kind, None)
    checkpointed = grads_with_checkpointing(kind, level)
    assert set(checkpointed) == set(reference)
    assert len(reference) == sum(1 for n, p in make_mope(kind).named_parameters() if p.requires_grad)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- rows 25, 26: dtypes


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_output_finite(kind):
    model = make_mope(kind).eval()
    with torch.no_grad():
        out = model(**inputs_for(kind))
    for key, value in outputs(out).items():
        assert torch.isfinite(value).all(), key
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.routing_weights).all()


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("kind", TWO_KINDS)
def test_forward_bfloat16(kind, autocast_adapter_dtype):
    base = FACTORIES[kind]().to(torch.bfloat16)
    model = make_mope(kind, base=base, autocast_adapter_dtype=autocast_adapter_dtype).eval()
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if PREFIX in n}
    if autocast_adapter_dtype:
        assert adapter_dtypes == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not is_adapter_param(n)} == {torch.bfloat16}
    batch = inputs_for(kind)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model(**batch)
    for key, value in outputs(out).items():
        assert torch.isfinite(value.float()).all(), key


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_forward_autocast_bfloat16(kind):
    model = make_mope(kind).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs_for(kind))
    for key, value in outputs(out).items():
        assert torch.isfinite(value.float()).all(), key
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_adapter_dtype_autocast():
    base = make_classifier().to(torch.bfloat16)
    model = make_mope("classifier", base=base)
    for name, param in model.named_parameters():
        if PREFIX in name:
            assert param.dtype == torch.float32, name
        elif ".modules_to_save." not in name:
            assert param.dtype == torch.bfloat16, name


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_in_features_out_features_exposed(kind):
    model = make_mope(kind)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for layer in layers:
        assert layer.in_features == layer.out_features == 32


# ------------------------------------------------------------------------------------- row 28: base model state dict


@pytest.mark.skipif(not hasattr(peft, "get_base_model_state_dict"), reason="needs peft.get_base_model_state_dict")
@pytest.mark.parametrize("kind", TWO_KINDS)
def test_get_base_model_state_dict(kind):
    reference = FACTORIES[kind]().state_dict()
    model = make_mope(kind)
    train_steps(model, kind, steps=1)
    base_sd = peft.get_base_model_state_dict(model)
    assert base_sd.keys() == reference.keys()
    assert all(torch.equal(base_sd[k], reference[k]) for k in reference)

    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter_param(n)}
    torch.manual_seed(123)
    new_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.items()}
    result = peft.set_base_model_state_dict(model, new_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    roundtrip = peft.get_base_model_state_dict(model)
    assert all(torch.equal(roundtrip[k], new_sd[k]) for k in new_sd)
    adapter_after = dict(model.named_parameters())
    assert all(torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)


# ------------------------------------------------------------------------------------------ row 29: pickle and copy


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_pickle_model(kind):
    model = make_mope(kind).eval()
    expected = run(model, kind)
    clone = pickle.loads(pickle.dumps(model))
    assert_same(run(clone, kind), expected, atol=0)
    # the clone is independent: unloading it removes its own hooks and leaves the original adapted
    base_outputs = run(FACTORIES[kind]().eval(), kind)
    assert_same(run(clone.unload(), kind), base_outputs)
    assert_same(run(model, kind), expected, atol=0)


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_deepcopy_model_after_training_forward(kind):
    model = make_mope(kind)
    model.train()
    model(**inputs_for(kind, train=True)).loss.backward()  # a training step, as before an EMA/teacher copy
    clone = copy.deepcopy(model)
    model.eval()
    clone.eval()
    assert_same(run(clone, kind), run(model, kind), atol=0)


def test_config_pickle_and_copy():
    config = MoPEConfig(num_experts=3, routed_layers=[1], init_weights=False)
    get_peft_model(make_classifier(), config)  # fills target_modules, modules_to_save and the tower sizes
    for clone in (pickle.loads(pickle.dumps(config)), copy.copy(config), copy.deepcopy(config)):
        assert type(clone) is MoPEConfig
        assert clone == config
        assert clone.to_dict() == config.to_dict()
        assert clone.peft_type == MMExpertsPeftType.MOPE
    deep = copy.deepcopy(config)
    deep.target_modules.append("x")
    assert "x" not in config.target_modules


def test_config_save_load_and_from_peft_type(tmp_path):
    config = MoPEConfig(num_experts=3, prompted_tower="text")
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is MoPEConfig and loaded.to_dict() == config.to_dict()
    assert type(PeftConfig.from_peft_type(peft_type="MOPE")) is MoPEConfig


# ----------------------------------------------------------------------------------------- row 31: parameter counts


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_get_nb_trainable_parameters(kind):
    base_count = sum(p.numel() for p in FACTORIES[kind]().parameters())
    model = make_mope(kind)
    adapter = 0
    for layer in (m for m in model.modules() if isinstance(m, MoPELayer)):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if "default" in container:
                entry = container["default"]
                adapter += entry.numel() if isinstance(entry, nn.Parameter) else sum(
                    p.numel() for p in entry.parameters())
    head = sum(p.numel() for p in model.base_model.model.classifier.parameters()) // 2 if kind == "classifier" else 0
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == adapter + head
    assert total == base_count + adapter + head  # the head's trainable copy counts once more


# ---------------------------------------------------------------------------------------------- row 33: AutoPeftModel


@pytest.mark.parametrize("kind", TWO_KINDS)
def test_auto_peft_model(kind, tmp_path):
    FACTORIES[kind]().save_pretrained(tmp_path / "base")
    base_cls = type(FACTORIES[kind]())
    base = base_cls.from_pretrained(tmp_path / "base").eval()
    assert base.name_or_path == str(tmp_path / "base")
    model = make_mope(kind, base=base).eval()
    expected = run(model, kind)
    model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert saved["auto_mapping"]["base_model_class"] == base_cls.__name__

    if kind == "classifier":
        # our class lives outside PEFT's default import allowlist: loading needs an explicit opt-in
        with pytest.raises(ValueError, match="import_allowlist"):
            AutoPeftModel.from_pretrained(tmp_path / "adapter")
        loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["mmexperts"])
    else:
        loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model, MoPEModel)
    assert type(loaded.get_base_model()) is base_cls
    state_dicts_equal(model, loaded)
    assert_same(run(loaded.eval(), kind), expected)


def test_classifier_registered_with_auto_model(tmp_path):
    from transformers import AutoModel

    make_classifier().save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is VisionTextModelForClassification


# --------------------------------------------------------------------------------------------------- model status


def test_get_model_status():
    model = make_mope("classifier")
    model.add_adapter("other", MoPEConfig(init_weights=False))
    status = peft.get_model_status(model)
    assert status.adapter_model_type == "MoPEModel"
    assert status.peft_types == {"default": "MOPE", "other": "MOPE"}
    assert status.trainable_params == model.get_nb_trainable_parameters()[0]
    assert status.num_adapter_layers == 5  # 4 MoPE blocks + the head's ModulesToSaveWrapper
    assert status.enabled is True
    assert status.active_adapters == ["default"]
    assert status.merged_adapters == []
    assert status.available_adapters == ["default", "other"]
    assert status.requires_grad == {"default": True, "other": False}
    layer_status = peft.get_layer_status(model)
    assert sum(s.module_type.startswith("mope.") for s in layer_status) == 4
    with model.disable_adapter():
        assert peft.get_model_status(model).enabled is False


# ------------------------------------------------------------------------------------ method-specific: hooks, router


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_hooks_are_cleaned_up(kind):
    model = make_mope(kind)
    snapshot = hook_snapshot(model)
    model.eval()
    run(model, kind)
    assert hook_snapshot(model) == snapshot
    model.train()
    model(**inputs_for(kind, train=True)).loss.backward()
    assert hook_snapshot(model) == snapshot
    # a failing call (one modality missing) cleans up too
    batch = inputs_for(kind)
    batch.pop("input_ids")
    batch.pop("attention_mask")
    with pytest.raises(ValueError, match="input_ids|modalit"):
        model(**batch)
    assert hook_snapshot(model) == snapshot
    with model.disable_adapter():
        run(model, kind)
    assert hook_snapshot(model) == snapshot


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_router_deterministic_in_eval(kind):
    model = make_mope(kind).eval()
    with torch.no_grad():
        first, second = model(**inputs_for(kind)), model(**inputs_for(kind))
    assert_same(outputs(first), outputs(second), atol=0)
    torch.testing.assert_close(first.routing_weights, second.routing_weights, atol=0, rtol=0)
    weights = first.routing_weights
    assert weights.shape == (2, 4, 4)  # routed blocks x batch x experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    # in training, router noise and prompt dropout make two calls differ
    model.train()
    with torch.no_grad():
        a, b = model(**inputs_for(kind)), model(**inputs_for(kind))
    assert not torch.equal(a.routing_weights, b.routing_weights)


@pytest.mark.parametrize("prompted_tower", ["vision", "text"])
@pytest.mark.parametrize("kind", TWO_KINDS)
def test_padding_does_not_leak(kind, prompted_tower):
    model = make_mope(kind, prompted_tower=prompted_tower).eval()
    batch = inputs_for(kind)
    with torch.no_grad():
        expected = outputs(model(**batch))
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    padding = batch["attention_mask"] == 0
    assert padding.any()
    generator = torch.Generator().manual_seed(1)
    changed["input_ids"][padding] = torch.randint(5, 99, (int(padding.sum()),), generator=generator)
    with torch.no_grad():
        assert_same(outputs(model(**changed)), expected)
