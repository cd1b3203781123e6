"""PEFT conformance battery: every generic PEFT behaviour, tested once, for every (method, base) row of TEST_CASES.

In the style of PEFT's ``tests/testing_common.py``: each test is a generic behaviour parametrised over the rows it
applies to, so a new method or base model gets the whole battery by adding a row. Method-specific behaviour (MoPE prompt
modes, S3 stages / keep ratio / pruning / task ids / concepts, Alt-MoE directions / features / retrieval) lives in the
method's own files. S3 has a row per design (``s3``: the paper design, ``s3_concepts``: the concept experts).

A row holds a factory for the base model, a config factory (small sizes; ``init_weights=False`` so no adapter starts as
an identity), a batch factory (padded batches; labels where the base has a head, ``return_loss=True`` for a training
batch where it has none) and a function giving the scalar training loss of an output.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import peft
import pytest
import torch
import yaml
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput

from mmexperts import (
    AltMoEConfig,
    AltMoEModel,
    MMExpertsPeftType,
    MoPEConfig,
    MoPELayer,
    MoPEModel,
    S3Config,
    S3Layer,
    S3Model,
    find_towers,
    push_adapter_to_hub,
)
from mmexperts.altmoe.config import RENAMED_DIRECTIONS
from mmexperts.altmoe.layer import AltMoELayer
from mmexperts.errors import ConfigError

from conftest import HIDDEN, make_batch, make_classifier, make_clip, make_dual_encoder, make_siglip

# ------------------------------------------------------------------------------------------------------ the methods


@dataclass(frozen=True)
class Method:
    """What the battery needs to know of one PEFT method."""

    config: Callable[..., PeftConfig]  # small config; keyword overrides win
    fewest_experts: dict  # config overrides with the fewest experts the method allows
    tuner: type
    layer: type
    peft_type: MMExpertsPeftType
    num_layers: int  # tuner layers injected into the tiny two-block towers
    own_fields: tuple[str, ...]  # output fields the adapter adds (flattened names, see `fields_of`)
    experts: str  # pattern of the expert parameters' names
    trains_head: bool  # puts the base's heads that it trains (Base.trained_heads) in modules_to_save
    lives_in_towers: bool  # has trainable parameters inside the towers' blocks (checkpointing recomputes them)
    multi_active_error: str | None  # None: several adapters may be active at once; else the error they raise
    runs_injected: bool = False  # works after peft.inject_adapter_in_model (else refuses, naming PeftModel)
    headless_effect: str | None = None  # on a base without a head, the field the adapter adds instead of changing


METHODS = {
    "mope": Method(
        config=lambda **kw: MoPEConfig(**{"init_weights": False, "prompt_length": 2, "static_prompt_length": 2,
                                          "complementary_prompt_length": 2, "mapper_hidden_size": 16, **kw}),
        fewest_experts={"num_experts": 0}, tuner=MoPEModel, layer=MoPELayer, peft_type=MMExpertsPeftType.MOPE,
        num_layers=4, own_fields=("aux_loss", "routing_weights"), experts=r"\.mope_experts\.",
        trains_head=True, lives_in_towers=True, multi_active_error=None),
    "s3": Method(  # the paper design: per-modality MoE encoder layers
        config=lambda **kw: S3Config(**{"design": "paper", "num_experts": 4, "top_k": 2, "latent_size": 16,
                                        "init_weights": False, **kw}),
        fewest_experts={"num_experts": 1, "top_k": 1}, tuner=S3Model, layer=S3Layer, peft_type=MMExpertsPeftType.S3,
        num_layers=2, own_fields=("aux_loss", "routing_weights", "fused_embeds", "modality_embeds"),
        experts=r"\.s3_encoder\.[^.]+\.blocks\.\d+\.moe\.experts\.", trains_head=False, lives_in_towers=False,
        multi_active_error=None, headless_effect="fused_embeds"),
    "s3_concepts": Method(
        config=lambda **kw: S3Config(**{"design": "concepts", "num_experts": 4, "latent_size": 16,
                                        "init_weights": False, **kw}),
        fewest_experts={"num_experts": 1}, tuner=S3Model, layer=S3Layer, peft_type=MMExpertsPeftType.S3,
        num_layers=2, own_fields=("aux_loss", "routing_weights", "concept_embeds", "fused_embeds"),
        experts=r"\.s3_core\.[^.]+\.experts\.", trains_head=False, lives_in_towers=False, multi_active_error=None,
        headless_effect="concept_embeds"),
    "altmoe": Method(
        config=lambda **kw: AltMoEConfig(**{"num_experts": 4, "top_k": 2, "hidden_size": 16, "dropout": 0.0,
                                            "init_weights": False, **kw}),
        fewest_experts={"num_experts": 1, "top_k": 1}, tuner=AltMoEModel, layer=AltMoELayer,
        peft_type=MMExpertsPeftType.ALTMOE, num_layers=1,
        own_fields=("aux_loss", "routing_weights", "vision_to_text.embeds", "vision_to_text.latent",
                    "text_to_vision.embeds", "text_to_vision.latent"),
        experts=r"\.altmoe_connector\.[^.]+\.experts\.", trains_head=False, lives_in_towers=False,
        multi_active_error="set_adapter"),
}

# -------------------------------------------------------------------------------------------------------- the bases


def labelled_batch(seed: int = 0, train: bool = False) -> dict:
    """A padded batch with class labels (bases with a classifier head)."""
    return make_batch(seed=seed)


def contrastive_batch(seed: int = 0, train: bool = False) -> dict:
    """A padded batch of image-text pairs (bases without a head); a training batch asks for the model's loss."""
    batch = make_batch(seed=seed, with_labels=False)
    if train:
        batch["return_loss"] = True
    return batch


def model_loss(out) -> torch.Tensor:
    return out.loss


def enable_checkpointing_on_towers(base: nn.Module, kwargs: dict) -> None:
    """For bases that refuse model-level checkpointing (VisionTextDualEncoderModel, in transformers 5): per tower."""
    base.vision_model.gradient_checkpointing_enable(**kwargs)
    base.text_model.gradient_checkpointing_enable(**kwargs)


def enable_checkpointing(base: nn.Module, kwargs: dict) -> None:
    base.gradient_checkpointing_enable(**kwargs)


@dataclass(frozen=True)
class Base:
    has_head: bool
    fields: tuple[str, ...]  # the base model's own output fields the battery compares
    enable_checkpointing: Callable[[nn.Module, dict], None]
    padding_invariant: bool  # False for SigLIP: its text tower pools the last position (trained on max-length padding)
    # heads over the towers a head-training method trains and saves: the classifier; a dual encoder's projections,
    # drawn at random when it is assembled from towers or configs (loaded whole, it keeps them)
    trained_heads: tuple[str, ...] = ()


PAIR_FIELDS = ("logits_per_image", "image_embeds", "text_embeds")
BASES = {
    "classifier": Base(True, ("logits",), enable_checkpointing, padding_invariant=True, trained_heads=("classifier",)),
    "dual_encoder": Base(False, PAIR_FIELDS, enable_checkpointing_on_towers, padding_invariant=True,
                         trained_heads=("text_projection", "visual_projection")),
    "clip": Base(False, PAIR_FIELDS, enable_checkpointing, padding_invariant=True),
    "siglip": Base(False, PAIR_FIELDS, enable_checkpointing, padding_invariant=False),
}

# ---------------------------------------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Case:
    method: str
    base: str
    make_base: Callable[[], nn.Module]
    make_config: Callable[..., PeftConfig]
    make_batch: Callable[..., dict]  # (seed=0, train=False) -> padded batch
    training_loss: Callable[[ModelOutput], torch.Tensor]

    @property
    def id(self) -> str:
        return f"{self.method}-{self.base}"

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def prefix(self) -> str:
        return self.spec.tuner.prefix

    @property
    def modules_to_save(self) -> bool:
        return self.spec.trains_head and bool(BASES[self.base].trained_heads)

    @property
    def effect_field(self) -> str:
        """The output field where the adapter's effect shows (S3 leaves a headless base's own outputs as they are)."""
        if self.spec.headless_effect and not BASES[self.base].has_head:
            return self.spec.headless_effect
        return BASES[self.base].fields[0]

    @property
    def compared_fields(self) -> tuple[str, ...]:
        """Per-example output fields that equivalent models must agree on."""
        return BASES[self.base].fields + self.spec.own_fields

    def adapted(self, seed: int = 0, adapter_name: str = "default", base: nn.Module | None = None,
                **overrides) -> PeftModel:
        """The base wrapped with a (seeded) adapter of this row."""
        base = self.make_base() if base is None else base
        torch.manual_seed(seed)
        return get_peft_model(base, self.make_config(**overrides), adapter_name=adapter_name)


MOPE, S3, S3_CONCEPTS, ALTMOE = (METHODS[name].config for name in ("mope", "s3", "s3_concepts", "altmoe"))

TEST_CASES = [
    #    method    base            base factory       config  batch factory      training loss
    Case("mope",   "classifier",   make_classifier,   MOPE,   labelled_batch,    model_loss),
    Case("mope",   "dual_encoder", make_dual_encoder, MOPE,   contrastive_batch, model_loss),
    Case("mope",   "clip",         make_clip,         MOPE,   contrastive_batch, model_loss),
    Case("mope",   "siglip",       make_siglip,       MOPE,   contrastive_batch, model_loss),
    Case("s3",     "classifier",   make_classifier,   S3,     labelled_batch,    model_loss),
    Case("s3",     "dual_encoder", make_dual_encoder, S3,     contrastive_batch, model_loss),
    Case("s3",     "clip",         make_clip,         S3,     contrastive_batch, model_loss),
    Case("s3",     "siglip",       make_siglip,       S3,     contrastive_batch, model_loss),
    Case("s3_concepts", "classifier",   make_classifier,   S3_CONCEPTS, labelled_batch,    model_loss),
    Case("s3_concepts", "dual_encoder", make_dual_encoder, S3_CONCEPTS, contrastive_batch, model_loss),
    Case("s3_concepts", "clip",         make_clip,         S3_CONCEPTS, contrastive_batch, model_loss),
    Case("s3_concepts", "siglip",       make_siglip,       S3_CONCEPTS, contrastive_batch, model_loss),
    Case("altmoe", "dual_encoder", make_dual_encoder, ALTMOE, contrastive_batch, model_loss),  # Alt-MoE: no head
    Case("altmoe", "clip",         make_clip,         ALTMOE, contrastive_batch, model_loss),
    Case("altmoe", "siglip",       make_siglip,       ALTMOE, contrastive_batch, model_loss),
]


def cases(where: Callable[[Case], bool] = lambda case: True):
    """``pytest.mark.parametrize`` over the rows a behaviour applies to."""
    return pytest.mark.parametrize("case", [c for c in TEST_CASES if where(c)], ids=lambda c: c.id)


ALL = cases()

# ----------------------------------------------------------------------------------------------------------- helpers


def fields_of(out) -> dict[str, torch.Tensor]:
    """The tensors of a model output, flattened (``vision_to_text.latent``, ``routing_weights.<adapter>``); the
    towers' raw outputs (``vision_model_output``...) are left out, their summaries are compared already."""
    flat = {}

    def add(name, value):
        if isinstance(value, torch.Tensor):
            flat[name] = value.detach().clone()
        elif isinstance(value, ModelOutput):
            return
        elif isinstance(value, dict):
            for key, item in value.items():
                add(f"{name}.{key}", item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                add(f"{name}.{f.name}", getattr(value, f.name))

    for key, value in out.items():
        add(key, value)
    return flat


@torch.no_grad()
def run(model: nn.Module, case: Case, seed: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
    return fields_of(model(**case.make_batch(seed=seed, train=train)))


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys(), f"different output fields: {sorted(set(a) ^ set(b))}"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def assert_differ(a: dict, b: dict, field: str):
    assert field in a and field in b, field
    assert a[field].shape != b[field].shape or not torch.allclose(a[field], b[field], atol=1e-5), \
        f"{field} unexpectedly unchanged"


def is_adapter_param(case: Case, name: str) -> bool:
    return case.prefix in name or ".modules_to_save." in name


def params_of(case: Case, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Adapter (and modules_to_save) parameters of one adapter, by name."""
    pattern = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    return {n: p for n, p in model.named_parameters() if is_adapter_param(case, n) and pattern.search(n)}


def without_name(params: dict, adapter: str) -> dict:
    return {re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", n): p for n, p in params.items()}


def trainability(case: Case, model: nn.Module) -> dict[str, set[bool]]:
    """requires_grad values of the base's parameters and of each adapter's."""
    result = {"base": set()}
    for name, param in model.named_parameters():
        if not is_adapter_param(case, name):
            result["base"].add(param.requires_grad)
            continue
        adapter = next(a for a in ("default", "other") if re.search(rf"\.{a}(\.|$)", name))
        result.setdefault(adapter, set()).add(param.requires_grad)
    return result


def missing_keys_of(result, adapter: str) -> list[str]:
    """The missing keys of ``adapter`` in a ``load_adapter`` result (PEFT lists every key that holds the adapter's
    name as a substring: "b" matches "base_model...", "efaul" matches "default")."""
    return [k for k in result.missing_keys if re.search(rf"\.{re.escape(adapter)}(\.|$)", k)]


def state_dicts_equal(a: nn.Module, b: nn.Module):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys(), sorted(set(sd_a) ^ set(sd_b))
    unequal = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
    assert not unequal, f"state dict entries differ: {unequal}"


def tuner_layers(case: Case, model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, case.spec.layer)]


def hook_snapshot(model: nn.Module) -> dict:
    """Every hook and instance-level ``forward`` override in the model (what a forward call may leave behind)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                   tuple(getattr(m, "_backward_pre_hooks", {})), "forward" in m.__dict__)
            for name, m in model.named_modules()}


def held_tensors(model: nn.Module) -> dict[str, int]:
    """Every tensor the model's modules (tuner included) hold outside their parameters and buffers, by attribute path
    (to its identity). Follows dicts, lists, dataclasses and plain objects; a call must leave this unchanged, or
    its activations (and their graph) outlive it."""
    found, seen = {}, set()
    skip = {"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"}

    def visit(value, label, depth):
        if id(value) in seen or depth > 4 or isinstance(value, (nn.Module, str, bytes, type)):
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found[label] = id(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{label}[{key!r}]", depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for i, item in enumerate(value):
                visit(item, f"{label}[{i}]", depth + 1)
        elif hasattr(value, "__dict__") and not callable(value):
            for key, item in vars(value).items():
                visit(item, f"{label}.{key}", depth + 1)

    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr not in skip:
                visit(value, f"{mod_name or '<root>'}.{attr}", 0)
    return found


def containers(value, label: str, depth: int = 0):
    """(label, container) for the dict-like (and str list-like) containers reachable from an attribute value, one
    dataclass level deep (per-call records are dataclasses of dicts)."""
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


def train_steps(model: PeftModel, case: Case, steps: int = 2, lr: float = 0.1) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        case.training_loss(model(**case.make_batch(seed=step, train=True))).backward()
        optimizer.step()
    model.eval()


# ------------------------------------------------------------------------------- module-scoped saved adapters


@dataclass
class Saved:
    """A trained adapter of one row (on a base loaded from disk, so ``base_model_name_or_path`` is real), saved as
    safetensors and as .bin, with its outputs. Read-only for the tests."""

    model: PeftModel
    base_dir: str
    safe_dir: str
    bin_dir: str
    outputs: dict
    train_outputs: dict
    base_outputs: dict


class Store:
    def __init__(self, root):
        self.root = root
        self._bases, self._saved, self._second = {}, {}, {}

    def base_dir(self, case: Case) -> str:
        if case.base not in self._bases:
            path = str(self.root / f"base-{case.base}")
            case.make_base().save_pretrained(path)
            self._bases[case.base] = path
        return self._bases[case.base]

    def saved(self, case: Case) -> Saved:
        if case.id not in self._saved:
            base_dir = self.base_dir(case)
            base = type(case.make_base()).from_pretrained(base_dir).eval()
            model = case.adapted(base=base)
            train_steps(model, case)  # trained parameters round-trip, not just their initial values
            safe_dir, bin_dir = str(self.root / f"{case.id}-safe"), str(self.root / f"{case.id}-bin")
            model.save_pretrained(safe_dir)
            model.save_pretrained(bin_dir, safe_serialization=False)
            self._saved[case.id] = Saved(model, base_dir, safe_dir, bin_dir, run(model, case),
                                         run(model, case, train=True), run(case.make_base(), case))
        return self._saved[case.id]

    def second(self, case: Case) -> tuple[str, dict]:
        """Another adapter of the row (other seed), saved, with its outputs."""
        if case.id not in self._second:
            model = case.adapted(seed=1).eval()
            path = str(self.root / f"{case.id}-second")
            model.save_pretrained(path)
            self._second[case.id] = (path, run(model, case))
        return self._second[case.id]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("conformance"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and several test processes share the cores); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- registration, naming


@ALL
def test_model_attributes_and_layers(case):
    model = case.adapted()
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, attr)
    assert isinstance(model.base_model, case.spec.tuner)
    assert model.peft_config["default"].peft_type == case.spec.peft_type
    layers = tuner_layers(case, model)
    assert len(layers) == case.spec.num_layers
    assert all(isinstance(m, BaseTunerLayer) for m in layers)
    for layer in layers:
        assert layer.in_features == layer.out_features == HIDDEN


@ALL
def test_custom_adapter_name(case):
    model = case.adapted(adapter_name="test-adapter")
    names = [n for n, _ in model.named_parameters()]
    adapter_names = [n for n in names if is_adapter_param(case, n)]
    assert adapter_names and all(".test-adapter" in n for n in adapter_names)
    assert not any(".default" in n for n in names)
    assert model.active_adapters == ["test-adapter"]
    with torch.no_grad():
        assert case.effect_field in fields_of(model(**case.make_batch()))


# ------------------------------------------------------------------------------------------------ save and load


def check_card_and_config(directory: str, model: PeftModel, case: Case) -> None:
    with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
        card = yaml.safe_load(re.search(r"---\n(.*?)\n---", f.read(), re.DOTALL).group(1))
    assert card["library_name"] == "peft"
    raw_name = model.get_base_model().config.to_dict().get("_name_or_path")  # PEFT's check_modelcard logic
    if raw_name:
        assert card["base_model"] == raw_name
    else:
        assert "base_model" not in card
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == case.spec.peft_type.value
    assert saved["base_model_name_or_path"] == (raw_name or None)
    expected = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=str))
    for key, value in expected.items():
        if key not in ("peft_type", "inference_mode", "base_model_name_or_path", "auto_mapping"):
            assert saved[key] == value, key


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@ALL
def test_save_pretrained_round_trip(case, safe, store):
    saved = store.saved(case)
    directory = saved.safe_dir if safe else saved.bin_dir
    if BASES[case.base].fields[0] == case.effect_field:  # a random adapter changes the base's outputs
        assert_differ(saved.outputs, saved.base_outputs, case.effect_field)
    files = set(os.listdir(directory))
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert {"adapter_config.json", weights, "README.md"} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & files
    assert ("adapter_model.bin" if safe else "adapter_model.safetensors") not in files
    check_card_and_config(directory, saved.model, case)

    tensors = load_file(os.path.join(directory, weights)) if safe else torch.load(os.path.join(directory, weights),
                                                                                  weights_only=True)
    assert tensors.keys() == get_peft_model_state_dict(saved.model).keys()
    heads = BASES[case.base].trained_heads if case.modules_to_save else ()
    leaked = [k for k in tensors if case.prefix not in k and k.split(".")[2] not in heads]
    assert not leaked, f"base weights leaked into the adapter file: {leaked}"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(case.make_base(), directory)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert isinstance(loaded.base_model, case.spec.tuner)
    assert type(loaded.peft_config["default"]) is type(saved.model.peft_config["default"])
    state_dicts_equal(saved.model, loaded)
    assert_same(run(loaded.eval(), case), saved.outputs)
    assert_same(run(loaded, case, train=True), saved.train_outputs)  # the loss too


@ALL
def test_auto_peft_model(case, store):
    saved = store.saved(case)
    base_cls = type(saved.model.get_base_model())
    assert type(AutoModel.from_pretrained(saved.base_dir)) is base_cls
    with open(os.path.join(saved.safe_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == saved.base_dir
    assert config["auto_mapping"]["base_model_class"] == base_cls.__name__
    if base_cls.__module__.startswith("transformers."):
        loaded = AutoPeftModel.from_pretrained(saved.safe_dir)
    else:  # a base class outside PEFT's default import allowlist needs an explicit opt-in
        with pytest.raises(ValueError, match="import_allowlist"):
            AutoPeftModel.from_pretrained(saved.safe_dir)
        loaded = AutoPeftModel.from_pretrained(saved.safe_dir, import_allowlist=["mmexperts"])
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model, case.spec.tuner)
    assert type(loaded.get_base_model()) is base_cls
    state_dicts_equal(saved.model, loaded)
    assert_same(run(loaded.eval(), case), saved.outputs)


@ALL
def test_push_to_hub_and_load_by_repo_id_offline(case, store, fake_hub):
    from huggingface_hub import ModelCard

    saved = store.saved(case)
    push_adapter_to_hub(saved.model, f"someone/{case.id}")
    (upload,) = fake_hub.uploads
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload["files"])
    assert json.loads(upload["files"]["adapter_config.json"])["peft_type"] == case.spec.peft_type.value
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "peft"
    assert {"mmexperts", case.spec.peft_type.value.lower()} <= set(card.data.tags)
    assert case.spec.tuner.method_name in card.text and "PeftModel.from_pretrained" in card.text
    loaded = PeftModel.from_pretrained(case.make_base(), f"someone/{case.id}").eval()
    assert_same(run(loaded, case), saved.outputs)


@ALL
def test_save_selected_adapters_and_names_containing_default(case, tmp_path):
    model = case.adapted()
    others = ["default2", "other_default", "foodefault_bar", "efaul"]  # not to be mistaken for "default"
    for i, name in enumerate(others):
        torch.manual_seed(i + 1)
        model.add_adapter(name, case.make_config())
    model.eval()
    expected = {}
    for name in ["default", *others]:
        model.set_adapter(name)
        expected[name] = run(model, case)
    assert_differ(expected["default"], expected["default2"], case.effect_field)
    model.set_adapter("default")

    model.save_pretrained(tmp_path / "selected", selected_adapters=["default"])
    assert not any((tmp_path / "selected" / name).exists() for name in others)
    saved = load_file(tmp_path / "selected" / "adapter_model.safetensors")
    reference = get_peft_model_state_dict(model, adapter_name="default")
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)

    model.save_pretrained(tmp_path / "all")
    loaded = PeftModel.from_pretrained(case.make_base(), tmp_path / "all")
    for name in others:
        assert (tmp_path / "all" / name / "adapter_model.safetensors").exists()
        result = loaded.load_adapter(tmp_path / "all" / name, adapter_name=name)
        assert missing_keys_of(result, name) == [] and result.unexpected_keys == []
    state_dicts_equal(model, loaded)
    loaded.eval()
    for name in ["default", *others]:
        loaded.set_adapter(name)
        assert_same(run(loaded, case), expected[name])


@ALL
def test_load_under_any_adapter_name(case, store, tmp_path):
    saved = store.saved(case)
    checkpoint = load_file(os.path.join(saved.safe_dir, "adapter_model.safetensors"))
    assert not [k for k in checkpoint if re.search(r"\.default(\.|$)", k)], "checkpoint keys name the adapter"

    mine = PeftModel.from_pretrained(case.make_base(), saved.safe_dir, adapter_name="mine").eval()
    assert mine.active_adapters == ["mine"]
    assert_same(run(mine, case), saved.outputs)
    reference = without_name(params_of(case, saved.model, "default"), "default")
    loaded = without_name(params_of(case, mine, "mine"), "mine")
    assert reference.keys() == loaded.keys()
    assert [n for n in reference if not torch.equal(reference[n], loaded[n])] == []

    # a second adapter loaded next to it equals the saved one and leaves the first as it was
    second_dir, second_outputs = store.second(case)
    result = mine.load_adapter(second_dir, adapter_name="b")
    assert missing_keys_of(result, "b") == [] and result.unexpected_keys == []
    assert_same(run(mine, case), saved.outputs)
    mine.set_adapter("b")
    assert_same(run(mine, case), second_outputs)
    mine.set_adapter("mine")
    assert_same(run(mine, case), saved.outputs)

    # an adapter saved under a custom name loads under "default"
    custom = case.adapted(seed=1, adapter_name="custom").eval()
    custom.save_pretrained(tmp_path)  # PEFT puts a non-default adapter in a subfolder named after it
    loaded = PeftModel.from_pretrained(case.make_base(), tmp_path / "custom").eval()
    assert loaded.active_adapters == ["default"]
    assert_same(run(loaded, case), second_outputs)


def with_earlier_names(saved: Saved, folder: Path) -> dict[str, str]:
    """Write ``saved``'s adapter into ``folder`` as it was saved before its fields (and Alt-MoE's direction names in
    weight keys) were renamed; returns the renamed fields, earlier name -> current name."""
    config = json.loads(Path(saved.safe_dir, "adapter_config.json").read_text())
    renamed_fields = type(saved.model.peft_config["default"]).renamed_fields
    renamed = {old: new for old, new in renamed_fields.items() if new in config}
    for old, new in renamed.items():
        config[old] = config.pop(new)
    earlier = {current: old for old, current in RENAMED_DIRECTIONS.items()}
    tensors = {".".join(earlier.get(part, part) for part in key.split(".")): value
               for key, value in load_file(os.path.join(saved.safe_dir, "adapter_model.safetensors")).items()}
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return renamed


@ALL
def test_adapter_saved_under_earlier_names_loads_the_same(case, store, tmp_path):
    saved = store.saved(case)
    renamed = with_earlier_names(saved, tmp_path / "earlier")
    assert renamed, "every method has renamed fields"
    if case.method == "altmoe":
        assert any("image_to_text" in key for key in load_file(str(tmp_path / "earlier/adapter_model.safetensors")))
    with pytest.warns(FutureWarning, match="is now called") as caught:
        loaded = PeftModel.from_pretrained(case.make_base(), str(tmp_path / "earlier")).eval()
    assert {str(w.message).split("'")[1] for w in caught if "is now called" in str(w.message)} == set(renamed)
    unsaved = ("inference_mode", "auto_mapping", "base_model_name_or_path")
    assert dataclasses.replace(loaded.peft_config["default"], **{k: None for k in unsaved}) == \
        dataclasses.replace(saved.model.peft_config["default"], **{k: None for k in unsaved})
    state_dicts_equal(saved.model, loaded)
    assert_same(run(loaded, case), saved.outputs)

    config_file = tmp_path / "earlier/adapter_config.json"  # both names at once: refused, naming both
    config = json.loads(config_file.read_text())
    old, new = next(iter(renamed.items()))
    config_file.write_text(json.dumps({**config, new: config[old]}))
    with pytest.raises(ConfigError, match=f"sets both '{old}' .*and '{new}'; keep only '{new}'"):
        PeftModel.from_pretrained(case.make_base(), str(tmp_path / "earlier"))


@ALL
def test_low_cpu_mem_usage_and_device_map(case, store):
    saved = store.saved(case)
    loaded = PeftModel.from_pretrained(case.make_base(), saved.safe_dir, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.state_dict().values()} == {"cpu"}, "meta tensors left"
    state_dicts_equal(saved.model, loaded)
    assert_same(run(loaded.eval(), case), saved.outputs)

    second_dir, second_outputs = store.second(case)
    loaded.load_adapter(second_dir, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.state_dict().values()} == {"cpu"}, "meta tensors left"
    loaded.set_adapter("other")
    assert_same(run(loaded, case), second_outputs)

    on_cpu = PeftModel.from_pretrained(case.make_base(), saved.safe_dir, device_map={"": "cpu"})
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    assert_same(run(on_cpu.eval(), case), saved.outputs)

    # injection with low_cpu_mem_usage leaves the adapter on the meta device, to be filled by a state dict
    injected = peft.inject_adapter_in_model(case.make_config(), case.make_base(), low_cpu_mem_usage=True)
    meta = [n for n, p in injected.named_parameters() if p.device.type == "meta"]
    assert meta and all(case.prefix in n for n in meta)


@ALL
def test_from_pretrained_with_config_object_and_trainability(case, store):
    saved = store.saved(case)
    config = PeftConfig.from_pretrained(saved.safe_dir)
    assert config.inference_mode is True
    config.inference_mode = False
    loaded = PeftModel.from_pretrained(case.make_base(), saved.safe_dir, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode  # is_trainable=False
    state_dicts_equal(saved.model, loaded)
    assert not any(p.requires_grad for p in loaded.parameters())

    loaded = PeftModel.from_pretrained(case.make_base(), saved.safe_dir, is_trainable=True)
    assert trainability(case, loaded) == {"base": {False}, "default": {True}}
    assert loaded.peft_config["default"].inference_mode is False
    # loading or adding a second adapter never changes the trainability of the first
    loaded.load_adapter(saved.safe_dir, adapter_name="other")
    assert trainability(case, loaded) == {"base": {False}, "default": {True}, "other": {False}}
    loaded.delete_adapter("other")
    loaded.load_adapter(saved.safe_dir, adapter_name="other", is_trainable=True)
    assert trainability(case, loaded) == {"base": {False}, "default": {True}, "other": {True}}
    loaded.delete_adapter("other")
    loaded.add_adapter("other", case.make_config())
    assert trainability(case, loaded) == {"base": {False}, "default": {True}, "other": {False}}

    frozen = PeftModel.from_pretrained(case.make_base(), saved.safe_dir)
    frozen.set_requires_grad("default", requires_grad=True)
    assert trainability(case, frozen) == {"base": {False}, "default": {True}}
    frozen.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in frozen.parameters())


# ----------------------------------------------------------------------------------------------- several adapters


@ALL
def test_set_adapter_and_requires_grad(case):
    model = case.adapted().eval()
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    out_default = run(model, case)
    torch.manual_seed(1)
    model.add_adapter("other", case.make_config())
    assert model.active_adapters == ["default"]
    assert trainability(case, model) == {"base": {False}, "default": {True}, "other": {False}}
    assert_same(run(model, case), out_default)

    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    assert trainability(case, model) == {"base": {False}, "default": {False}, "other": {True}}
    assert_differ(run(model, case), out_default, case.effect_field)
    model.set_adapter("default", inference_mode=True)
    assert trainability(case, model) == {"base": {False}, "default": {False}, "other": {False}}
    assert_same(run(model, case), out_default)

    model.set_requires_grad("other", requires_grad=True)
    assert trainability(case, model) == {"base": {False}, "default": {False}, "other": {True}}
    model.set_requires_grad("default", requires_grad=True)
    assert trainability(case, model) == {"base": {False}, "default": {True}, "other": {True}}
    model.set_requires_grad("other", requires_grad=False)
    assert trainability(case, model) == {"base": {False}, "default": {True}, "other": {False}}
    frozen = case.adapted(inference_mode=True)
    assert not any(p.requires_grad for p in frozen.parameters())


@ALL
def test_several_active_adapters(case):
    model = case.adapted().eval()
    out_default = run(model, case)
    torch.manual_seed(1)
    model.add_adapter("other", case.make_config())
    model.set_adapter("other")
    out_other = run(model, case)
    if case.modules_to_save:  # PEFT's ModulesToSaveWrapper (the trained head) takes one adapter at a time
        with pytest.raises(ValueError, match="Only one adapter can be set"):
            model.base_model.set_adapter(["default", "other"])
        return
    model.base_model.set_adapter(["default", "other"])
    assert model.base_model.active_adapter == ["default", "other"]
    if case.spec.multi_active_error:
        with pytest.raises(ValueError, match=case.spec.multi_active_error):
            model(**case.make_batch())
        return
    with torch.no_grad():
        out = model(**case.make_batch())
    both = fields_of(out)
    if case.effect_field in both:  # one output from both adapters
        assert_differ(both, out_default, case.effect_field)
        assert_differ(both, out_other, case.effect_field)
    else:  # one output per adapter
        assert {f"{case.effect_field}.default", f"{case.effect_field}.other"} <= set(both)
    assert isinstance(out.routing_weights, dict) and set(out.routing_weights) == {"default", "other"}


@ALL
def test_delete_adapter_cleans_up(case):
    model = case.adapted().eval()
    out_default = run(model, case)
    base_outputs = run(case.make_base(), case)
    torch.manual_seed(1)
    model.add_adapter("other", case.make_config())
    model.set_adapter("other")
    model.train()
    case.training_loss(model(**case.make_batch(train=True))).backward()  # "other" leaves traces in per-call records
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Adapter other was active which is now deleted"
        model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names + module.other_param_names:
                assert "other" not in getattr(module, attr), attr
    assert not params_of(case, model, "other")
    assert leftovers(model, "default"), "sanity check: the scan must see the live adapter"
    assert leftovers(model, "other") == []
    assert_same(run(model, case), out_default)

    model.add_adapter("inactive", case.make_config())  # never active, then deleted
    model.delete_adapter("inactive")
    assert leftovers(model, "inactive") == [] and not params_of(case, model, "inactive")
    assert_same(run(model, case), out_default)

    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")

    model.delete_adapter("default")
    assert model.active_adapters == []
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert_same(fields_of(model.base_model(**case.make_batch())), base_outputs)


# ------------------------------------------------------------------------------------------------ disable_adapter


@ALL
def test_disable_adapter_gives_the_base_model(case):
    base_outputs = run(case.make_base(), case)
    base_train_outputs = run(case.make_base(), case, train=True)
    model = case.adapted().eval()
    adapted = run(model, case)
    if BASES[case.base].fields[0] == case.effect_field:
        assert_differ(adapted, base_outputs, case.effect_field)
    with model.disable_adapter():
        # exactly the base's outputs, and no routing fields: the routers and experts are off
        assert_same(run(model, case), base_outputs)
        assert_same(run(model, case, train=True), base_train_outputs)
        assert peft.get_model_status(model).enabled is False
        model.train()
        loss = case.training_loss(model(**case.make_batch(train=True)))
        if loss.requires_grad:
            loss.backward()
        model.eval()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == [], "adapter trained while disabled"
    assert_same(run(model, case), adapted)

    # leaving the context restores the state before it, even a disabled one
    model.base_model.disable_adapter_layers()
    with model.disable_adapter():
        assert_same(run(model, case), base_outputs)
    assert peft.get_model_status(model).enabled is False
    assert_same(run(model, case), base_outputs)
    model.base_model.enable_adapter_layers()
    assert_same(run(model, case), adapted)


@cases(lambda c: c.spec.num_layers > 1)
def test_disable_adapter_from_an_irregular_state(case):
    model = case.adapted().eval()
    adapted = run(model, case)
    tuner_layers(case, model)[-1].enable_adapters(False)
    assert peft.get_model_status(model).enabled == "irregular"
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert peft.get_model_status(model).enabled is True
    assert_same(run(model, case), adapted)


# ------------------------------------------------------------------------------------------------------- training


def adapter_grads(model: nn.Module) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@ALL
def test_only_adapter_parameters_train(case):
    model = case.adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(params_of(case, model, "default"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    case.training_loss(model(**case.make_batch(train=True))).backward()
    grads = adapter_grads(model)
    assert set(grads) <= trainable, f"frozen parameters got gradients: {sorted(set(grads) - trainable)}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    train_steps(model, case, steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)}"
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers()), "a buffer changed in training"


@ALL
def test_training_loss_reaches_every_adapter_parameter(case):
    """Every trainable parameter, the experts included, gets a gradient from the training loss and changes after an
    optimizer step; also for S3 on a base without a classifier head, whose loss once never reached the experts."""
    model = case.adapted()
    model.train()
    out = model(**case.make_batch(train=True))
    loss = case.training_loss(out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert unreached == [], f"the training loss does not reach: {unreached}"
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if re.search(case.spec.experts, n)}
    assert experts, case.spec.experts
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    params = dict(model.named_parameters())
    assert [n for n in experts if torch.equal(experts[n], params[n])] == [], "experts unchanged by a step"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@ALL
def test_gradient_checkpointing(case, reentrant):
    def grads(checkpointing: bool):
        model = case.adapted()
        base = model.get_base_model()
        if checkpointing:
            BASES[case.base].enable_checkpointing(base, {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}})
        model.train()
        towers = find_towers(base)
        blocks = [getattr(b, "base_layer", b) for t in towers.values() for b in t.blocks]
        assert all(b.gradient_checkpointing == checkpointing for b in blocks)
        # a leaf inside the first block of the vision tower: it runs again in backward when checkpointing recomputes
        block = towers["vision"].blocks[0]
        leaf = next(m for n, m in block.named_modules() if isinstance(m, nn.Linear) and case.prefix not in n)
        calls = []
        handle = leaf.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same router noise and dropout in both runs
        case.training_loss(model(**case.make_batch(train=True))).backward()
        handle.remove()
        return adapter_grads(model), len(calls)

    reference, calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert calls == 1
    if case.spec.lives_in_towers:  # the adapter's gradients come through the recomputed blocks
        assert checkpointed_calls == 2
    assert set(checkpointed) == set(reference) and reference
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


# -------------------------------------------------------------------------------------------------------- forward


@ALL
def test_forward_is_finite_and_deterministic_in_eval(case):
    model = case.adapted().eval()
    first, second = run(model, case, train=True), run(model, case, train=True)
    assert_same(first, second)
    for name in case.compared_fields:
        assert name in first, name
    for name, value in first.items():
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize("config", ["default", "fewest_experts"])
@ALL
def test_output_fields_whatever_the_config(case, config):
    """``aux_loss`` (a scalar) and ``routing_weights`` ((sites, batch, experts); empty where nothing is routed) come
    with every output of an enabled adapter, whatever its config."""
    overrides = case.spec.fewest_experts if config == "fewest_experts" else {}
    model = case.adapted(**overrides)
    batch = case.make_batch(train=True)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(**batch)
        assert isinstance(out.get("aux_loss"), torch.Tensor), f"{mode}: no aux_loss"
        assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
        routing = out.get("routing_weights")
        assert isinstance(routing, torch.Tensor), f"{mode}: no routing_weights"
        assert routing.ndim == 3 and routing.shape[1] == batch["pixel_values"].shape[0]
        assert torch.isfinite(case.training_loss(out))


@pytest.mark.parametrize("mode", ["bf16_base", "bf16_base_no_adapter_autocast", "cpu_autocast"])
@ALL
def test_bfloat16(case, mode):
    batch = case.make_batch(train=True)
    if mode == "cpu_autocast":
        model = case.adapted().eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    else:
        base = case.make_base().to(torch.bfloat16)
        torch.manual_seed(0)
        model = get_peft_model(base, case.make_config(), autocast_adapter_dtype=mode == "bf16_base").eval()
        if mode == "bf16_base":  # PEFT's autocast_adapter_dtype keeps the adapter in float32
            assert {p.dtype for n, p in model.named_parameters() if case.prefix in n} == {torch.float32}
        assert {p.dtype for n, p in model.named_parameters() if not is_adapter_param(case, n)} == {torch.bfloat16}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            out = model(**batch)
    fields = fields_of(out)
    for name in case.compared_fields:
        assert name in fields, name
    for name, value in fields.items():
        assert torch.isfinite(value.float()).all(), name


@cases(lambda c: BASES[c.base].padding_invariant)
def test_padding_does_not_change_outputs(case):
    model = case.adapted().eval()
    batch = case.make_batch()
    with torch.no_grad():
        expected = fields_of(model(**batch))
    longer = dict(batch)  # three more padding columns
    longer["input_ids"] = torch.cat([batch["input_ids"], torch.ones(4, 3, dtype=torch.long)], 1)
    longer["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(4, 3, dtype=torch.long)], 1)
    garbage = dict(batch)  # other token ids under the padding
    padding = batch["attention_mask"] == 0
    assert padding.any()
    garbage["input_ids"] = batch["input_ids"].clone()
    garbage["input_ids"][padding] = torch.randint(5, 99, (int(padding.sum()),),
                                                  generator=torch.Generator().manual_seed(1))
    for other in (longer, garbage):
        with torch.no_grad():
            got = fields_of(model(**other))
        for name in case.compared_fields:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, k=name: f"{k}: {m}")


@ALL
def test_calls_leave_no_hooks_and_no_tensors_behind(case):
    model = case.adapted().eval()
    run(model, case)  # a first call may set up what every call reuses
    hooks, tensors = hook_snapshot(model), held_tensors(model)

    def check(step):
        assert hook_snapshot(model) == hooks, f"{step} left hooks behind"
        assert held_tensors(model) == tensors, f"{step} left tensors behind"

    run(model, case)
    check("an eval call")
    model.train()
    out = model(**case.make_batch(train=True))
    check("a training call")
    case.training_loss(out).backward()
    check("backward")
    batch = case.make_batch()  # a failing call (no text) cleans up too
    batch.pop("input_ids")
    batch.pop("attention_mask")
    with pytest.raises(ValueError):
        model(**batch)
    check("a failing call")
    model.eval()
    with model.disable_adapter():
        run(model, case)
    check("a disabled call")


@ALL
def test_calls_and_helpers_keep_requires_grad_and_modes(case, tmp_path, capsys):
    model = case.adapted()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def modes():
        return {n: m.training for n, m in model.named_modules()}

    def check(step):
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, f"{step} changed requires_grad"
        assert modes() == expected_modes, f"{step} changed train/eval modes"

    for mode in ("train", "eval"):
        getattr(model, mode)()
        expected_modes = modes()
        out = model(**case.make_batch(train=True))
        check("a forward call")
        if mode == "train":
            case.training_loss(out).backward()
            check("backward")
        with model.disable_adapter():
            model(**case.make_batch(train=True))
        check("a disabled forward call")
        model.get_nb_trainable_parameters()
        model.print_trainable_parameters()
        peft.get_model_status(model)
        peft.get_layer_status(model)
        check("the status helpers")
        model.save_pretrained(tmp_path / mode)
        check("save_pretrained")
    capsys.readouterr()


# ---------------------------------------------------------------------------------------- merge, unload, inject


@ALL
def test_merge_refused_and_unload_gives_the_base(case):
    reference = case.make_base()
    base_outputs = run(reference, case)
    model = case.adapted().eval()
    expected = run(model, case)
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.base_model.merge_and_unload(safe_merge=True)
    assert [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)] == layers
    assert peft.get_model_status(model).merged_adapters == []
    assert_same(run(model, case), expected)

    unloaded = model.unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    assert unloaded.state_dict().keys() == reference.state_dict().keys()
    assert hook_snapshot(unloaded) == hook_snapshot(reference)  # every hook the adapter attached is gone
    assert_same(run(unloaded, case), base_outputs)


@ALL
def test_adapter_outside_its_peft_model(case):
    """Outside a PeftModel (``peft.inject_adapter_in_model``, or the adapted base called directly) an adapter either
    works (outputs differ from the base and depend on the adapter) or refuses clearly. The mmexperts methods compute
    per-call state in their PeftModel's forward, so they must refuse, naming PeftModel."""
    base_outputs = run(case.make_base(), case)
    torch.manual_seed(0)
    injected = peft.inject_adapter_in_model(case.make_config(), case.make_base()).eval()
    assert len(tuner_layers(case, injected)) == case.spec.num_layers
    model = case.adapted().eval()
    run(model, case)  # a call through the PeftModel first: what it sets up for the call must not outlive it
    if not case.spec.runs_injected:
        with pytest.raises((ValueError, RuntimeError), match="PeftModel"):
            injected(**case.make_batch())
        with pytest.raises((ValueError, RuntimeError), match="PeftModel"):
            model.get_base_model()(**case.make_batch())
        with model.disable_adapter():  # a disabled adapter is the plain base, wherever it is called from
            assert_same(run(model.get_base_model(), case), base_outputs)
        return
    adapted = run(injected, case)
    assert_differ(adapted, base_outputs, case.effect_field)
    with torch.no_grad():
        for name, param in injected.named_parameters():
            if case.prefix in name:
                param.add_(1.0)
    assert_differ(run(injected, case), adapted, case.effect_field)
    assert_same(run(model.get_base_model(), case), run(model, case))


@ALL
def test_transformers_adapter_api(case):
    """transformers' own adapter methods on the base (``add_adapter``, ``active_adapters``, ``disable_adapters``,
    ``enable_adapters``, ``delete_adapter``) go through PEFT's injection: the layers are added and switched, and a
    forward refuses clearly, as any adapter outside its PeftModel."""
    base_outputs = run(case.make_base(), case)
    base = case.make_base().eval()
    base.add_adapter(case.make_config(), adapter_name="mine")
    assert base.active_adapters() == ["mine"] and len(tuner_layers(case, base)) == case.spec.num_layers
    with pytest.raises((ValueError, RuntimeError), match="PeftModel"):
        base(**case.make_batch())
    base.disable_adapters()
    assert_same(run(base, case), base_outputs)
    base.enable_adapters()
    base.delete_adapter("mine")
    assert_same(run(base, case), base_outputs)


# ------------------------------------------------------------------------------------------------ copies, configs


@ALL
def test_pickle_and_deepcopy_after_a_training_forward(case):
    base_outputs = run(case.make_base(), case)
    model = case.adapted()
    model.train()
    case.training_loss(model(**case.make_batch(train=True))).backward()  # as before an EMA / teacher copy
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    model.eval()
    expected = run(model, case)
    for clone in clones:
        assert_same(run(clone.eval(), case), expected)
    # a clone is independent: unloading it removes its own hooks and leaves the original adapted
    assert_same(run(clones[0].unload(), case), base_outputs)
    assert_same(run(model, case), expected)


@ALL
def test_config_copy_pickle_and_from_pretrained(case, tmp_path):
    config = case.make_config()
    get_peft_model(case.make_base(), config)  # fills target_modules, modules_to_save and the tower sizes
    assert config.target_modules and config.vision_hidden_size == config.text_hidden_size == HIDDEN
    for clone in (pickle.loads(pickle.dumps(config)), copy.copy(config), copy.deepcopy(config)):
        assert type(clone) is type(config)
        assert clone == config and clone.to_dict() == config.to_dict()
        assert clone.peft_type == case.spec.peft_type
    deep = copy.deepcopy(config)
    deep.target_modules.append("x")
    assert "x" not in config.target_modules
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.to_dict() == config.to_dict()
    assert type(PeftConfig.from_peft_type(peft_type=case.spec.peft_type.value)) is type(config)


# -------------------------------------------------------------------------------------- counts, status, state dicts


@ALL
def test_parameter_counts_and_status(case, capsys):
    base_count = sum(p.numel() for p in case.make_base().parameters())
    model = case.adapted()
    adapter = 0
    for layer in tuner_layers(case, model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if "default" in container:
                entry = container["default"]
                adapter += entry.numel() if isinstance(entry, nn.Parameter) else sum(
                    p.numel() for p in entry.parameters())
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(wrappers) == (len(BASES[case.base].trained_heads) if case.modules_to_save else 0)
    head = sum(p.numel() for w in wrappers for p in w.modules_to_save["default"].parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == adapter + head
    assert total == base_count + adapter + head  # the head's trainable copy counts once more
    capsys.readouterr()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * trainable / total:.4f}")

    torch.manual_seed(1)
    model.add_adapter("other", case.make_config())
    status = peft.get_model_status(model)
    assert status.adapter_model_type == case.spec.tuner.__name__
    assert status.peft_types == {"default": case.spec.peft_type.value, "other": case.spec.peft_type.value}
    assert status.trainable_params == trainable
    assert status.num_adapter_layers == case.spec.num_layers + len(wrappers)
    assert status.enabled is True and status.merged_adapters == []
    assert status.active_adapters == ["default"] and status.available_adapters == ["default", "other"]
    assert status.requires_grad == {"default": True, "other": False}
    layer_status = peft.get_layer_status(model)
    kind = f"{case.prefix.rstrip('_')}."
    assert sum(s.module_type.startswith(kind) for s in layer_status) == case.spec.num_layers


@pytest.mark.skipif(not hasattr(peft, "get_base_model_state_dict"), reason="needs peft.get_base_model_state_dict")
@ALL
def test_get_and_set_base_model_state_dict(case):
    reference = case.make_base().state_dict()
    model = case.adapted()
    train_steps(model, case, steps=1)
    base_sd = peft.get_base_model_state_dict(model)
    assert base_sd.keys() == reference.keys()
    assert all(torch.equal(base_sd[k], reference[k]) for k in reference)

    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter_param(case, n)}
    torch.manual_seed(123)
    new_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.items()}
    result = peft.set_base_model_state_dict(model, new_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    roundtrip = peft.get_base_model_state_dict(model)
    assert all(torch.equal(roundtrip[k], new_sd[k]) for k in new_sd)
    adapter_after = dict(model.named_parameters())
    assert all(torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before)
