"""Property-based safety checks: every config field refuses bad values with a ConfigError naming it, valid tiny configs
run forward and backward on random batches, and mismatched or oversized inputs are refused early."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, fields

import peft
import pytest
import torch
from hypothesis import Phase, assume, example, given, settings
from hypothesis import strategies as st

from mmexperts import AltMoEConfig, MoPEConfig, S3Config
from mmexperts.errors import ConfigError
from mmexperts.moe import DISPATCH_MODES

from conftest import IMAGE_SIZE, VOCAB, make_classifier, make_dual_encoder

PATCH_TOKENS = (IMAGE_SIZE // 6) ** 2 + 1  # the tiny ViT's patches + [CLS]
BLOCKS = 2  # blocks per tower in the tiny models
# A failing forward example is reported as drawn: shrinking one takes minutes.
FORWARD = settings(max_examples=40, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate))
CONFIGS = settings(max_examples=200, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run fastest on one thread; on shared cores, more threads mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- field rules: the oracle ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What one field accepts: an int or float in [low, high] (open ends where asked), or one of ``choices``."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple = ()

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if self.kind == "float":
            try:
                value = float(value)
            except OverflowError:  # an int no float can hold
                return False
            if not math.isfinite(value):
                return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok


def Int(low=None, optional=False):
    return Rule("int", low, optional=optional)


def Float(low, high=None, low_open=False, high_open=False, optional=False):
    return Rule("float", low, high, low_open, high_open, optional)


def Choice(*choices):
    return Rule("choice", choices=choices)


SHARED = {"vision_hidden_size": Int(1, optional=True), "text_hidden_size": Int(1, optional=True)}
PROBABILITY = Float(0, 1, high_open=True)
# S3 validates every field in both designs (a field of the other design is checked, then unused); what differs by
# design are the rules across fields, in cross_field_error.
S3_RULES = {
    **SHARED, "design": Choice("paper", "concepts"), "num_experts": Int(1), "latent_size": Int(1),
    "expert_hidden_size": Int(1, optional=True), "expert_size": Int(1, optional=True), "top_k": Int(1, optional=True),
    "num_tasks": Int(1), "task_embedding_size": Int(1), "num_labels": Int(0, optional=True), "token_layer": Int(),
    "num_layers": Int(1), "num_heads": Int(1), "keep_ratio": Float(0, 1, low_open=True),
    "stage": Choice("specialization", "selection"), "assignment_temperature": Float(0, low_open=True),
    "router_temperature": Float(0, low_open=True), "ssl_temperature": Float(0, low_open=True),
    "router_noise_std": Float(0), "diversity_loss_weight": Float(0), "balance_loss_weight": Float(0),
    "sharpness_loss_weight": Float(0), "load_balance_loss_weight": Float(0), "z_loss_weight": Float(0),
    "ssl_loss_weight": Float(0, optional=True), "ssl_noise_std": Float(0), "rep_loss_weight": Float(0),
    "dsc_loss_weight": Float(0), "supcon_loss_weight": Float(0), "compactness_loss_weight": Float(0),
    "dropout": PROBABILITY, "ssl_token_drop": PROBABILITY, "head_input": Choice("concat", "sum"),
    "dispatch": Choice(*DISPATCH_MODES),
}
RULES = {  # per method: S3 has a row per design
    "mope": {
        **SHARED, "prompted_tower": Choice("vision", "text"), "prompt_mode": Choice("tokens", "prefix"),
        "num_experts": Int(0), "prompt_length": Int(1), "static_prompt_length": Int(0),
        "mapped_prompt_length": Int(0), "complementary_prompt_length": Int(0), "mapper_hidden_size": Int(0),
        "router_self_size": Int(0), "router_cross_size": Int(0), "router_temperature": Float(0, low_open=True),
        "router_noise_std": Float(0), "importance_loss_weight": Float(0), "importance_threshold": Float(0),
        "prompt_dropout": PROBABILITY,
    },
    "s3": S3_RULES,
    "s3_concepts": S3_RULES,
    "altmoe": {
        **SHARED, "num_experts": Int(1), "top_k": Int(1), "hidden_size": Int(1),
        "expert_hidden_size": Int(1, optional=True), "dropout": PROBABILITY, "router_noise_std": Float(0),
        "temperature": Float(0, low_open=True), "alpha": Float(0, 1), "load_balance_loss_weight": Float(0),
        "dispatch": Choice(*DISPATCH_MODES), "direction_schedule": Choice("alternating", "joint"),
        "regression_loss": Choice("smooth_l1", "l2"),
    },
}


def cross_field_error(cls, kwargs: dict) -> str | None:
    """The field a rule across fields blames, given fields that are each valid on their own (first rule first)."""
    get = lambda name: kwargs.get(name, next(f.default for f in fields(cls) if f.name == name))  # noqa: E731
    if cls is MoPEConfig:
        if get("num_experts") == 0 and not (get("static_prompt_length") or get("mapped_prompt_length")):
            return "num_experts"
        if get("num_experts") and get("router_self_size") + get("router_cross_size") < 1:
            return "router_self_size"
        return None
    # S3 paper design: top_k None means min(2, num_experts), which always fits
    if get("top_k") is not None and get("top_k") > get("num_experts"):
        return "top_k"
    if cls is S3Config and get("design") == "paper":
        if get("latent_size") % get("num_heads"):  # each attention head gets latent_size / num_heads channels
            return "num_heads"
        if get("num_tasks") != 1:  # one task: the linear probe
            return "num_tasks"
    elif cls is S3Config:  # concepts: sparsifies through its expert mask and has no stages
        if get("keep_ratio") != 1:
            return "keep_ratio"
        if get("stage") != "specialization":
            return "stage"
    return None


def expected_error(method: str, kwargs: dict, changed: str | None) -> str | None:
    """The field a ConfigError must name for ``kwargs`` (a valid base with at most ``changed`` altered), or None."""
    if changed is not None and not RULES[method][changed].accepts(kwargs[changed]):
        return changed
    return cross_field_error(METHODS[method][0], kwargs)


def check_config(method: str, kwargs: dict, changed: str | None) -> None:
    """Valid kwargs construct; invalid ones raise a ConfigError whose field and message name the bad field."""
    cls = METHODS[method][0]
    field = expected_error(method, kwargs, changed)
    if field is None:
        cls(**kwargs)
        return
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.field == field, f"{info.value.field=} for {changed}={kwargs[changed]!r}: {info.value}"
    assert field in str(info.value)


# ---- valid tiny configs ----------------------------------------------------------------------------------------
def unit(low=0.0, high=1.0):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@st.composite
def mope_kwargs(draw) -> dict:
    kwargs = dict(
        prompted_tower=draw(st.sampled_from(("vision", "text"))),
        prompt_mode=draw(st.sampled_from(("tokens", "prefix"))),
        num_experts=draw(st.integers(0, 4)), prompt_length=draw(st.integers(1, 3)),
        static_prompt_length=draw(st.integers(0, 3)), mapped_prompt_length=draw(st.integers(0, 3)),
        complementary_prompt_length=draw(st.integers(0, 3)), mapper_hidden_size=draw(st.integers(0, 16)),
        router_self_size=draw(st.integers(0, 4)), router_cross_size=draw(st.integers(0, 4)),
        router_temperature=draw(unit(0.05, 2.0)), router_noise_std=draw(unit(0, 0.1)),
        importance_loss_weight=draw(unit()), importance_threshold=draw(unit()), prompt_dropout=draw(unit(0, 0.9)),
        routed_layers=draw(st.none() | st.lists(st.integers(0, BLOCKS - 1), min_size=1, max_size=BLOCKS, unique=True)),
        init_weights=draw(st.booleans()),
    )
    if kwargs["num_experts"] == 0 and not (kwargs["static_prompt_length"] or kwargs["mapped_prompt_length"]):
        kwargs["static_prompt_length"] = 1
    if kwargs["num_experts"] and kwargs["router_self_size"] + kwargs["router_cross_size"] < 1:
        kwargs["router_self_size"] = 1
    return kwargs


@st.composite
def s3_kwargs(draw) -> dict:
    """The paper design; the concepts design's own fields stay at their defaults."""
    num_experts, num_heads = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return dict(
        design="paper", num_experts=num_experts, top_k=draw(st.none() | st.integers(1, num_experts)),
        num_heads=num_heads, latent_size=num_heads * draw(st.integers(1, 4)), num_layers=draw(st.integers(1, 2)),
        expert_hidden_size=draw(st.none() | st.integers(1, 16)), keep_ratio=draw(st.just(1.0) | unit(0.01, 1.0)),
        stage=draw(st.sampled_from(("specialization", "selection"))),
        num_labels=draw(st.sampled_from((None, 0, 1, 2, 3, 5))), token_layer=draw(st.integers(-BLOCKS, BLOCKS - 1)),
        dispatch=draw(st.sampled_from(DISPATCH_MODES)), dropout=draw(unit(0, 0.5)),
        router_temperature=draw(unit(0.1, 2.0)), router_noise_std=draw(unit(0, 0.1)),
        load_balance_loss_weight=draw(unit()), z_loss_weight=draw(unit()), rep_loss_weight=draw(unit()),
        dsc_loss_weight=draw(unit()), supcon_loss_weight=draw(unit()), compactness_loss_weight=draw(unit()),
        ssl_temperature=draw(unit(0.05, 1.0)), ssl_token_drop=draw(unit(0, 0.9)), ssl_noise_std=draw(unit(0, 0.5)),
        init_weights=draw(st.booleans()),
    )


@st.composite
def s3_concepts_kwargs(draw) -> dict:
    """The concepts design; the paper design's own fields stay at their defaults."""
    num_experts = draw(st.integers(1, 4))
    return dict(
        design="concepts", num_experts=num_experts, latent_size=draw(st.integers(4, 16)),
        expert_hidden_size=draw(st.none() | st.integers(1, 16)), expert_size=draw(st.none() | st.integers(1, 16)),
        top_k=draw(st.none() | st.integers(1, num_experts)), num_tasks=draw(st.integers(1, 3)),
        task_embedding_size=draw(st.integers(1, 8)), num_labels=draw(st.sampled_from((None, 0, 1, 2, 3, 5))),
        token_layer=draw(st.integers(-BLOCKS, BLOCKS - 1)), head_input=draw(st.sampled_from(("concat", "sum"))),
        dispatch=draw(st.sampled_from(DISPATCH_MODES)), dropout=draw(unit(0, 0.5)),
        assignment_temperature=draw(unit(0.1, 2.0)), router_temperature=draw(unit(0.1, 2.0)),
        router_noise_std=draw(unit(0, 0.1)), diversity_loss_weight=draw(unit()), balance_loss_weight=draw(unit()),
        sharpness_loss_weight=draw(unit()), load_balance_loss_weight=draw(unit()), z_loss_weight=draw(unit()),
        ssl_loss_weight=draw(st.none() | st.just(0.0) | unit()), ssl_temperature=draw(unit(0.05, 1.0)),
        ssl_token_drop=draw(unit(0, 0.9)), ssl_noise_std=draw(unit(0, 0.5)), init_weights=draw(st.booleans()),
    )


@st.composite
def altmoe_kwargs(draw) -> dict:
    num_experts = draw(st.integers(1, 4))
    return dict(
        num_experts=num_experts, top_k=draw(st.integers(1, num_experts)), hidden_size=draw(st.integers(8, 32)),
        expert_hidden_size=draw(st.none() | st.integers(4, 16)), dropout=draw(unit(0, 0.5)),
        renormalize=draw(st.booleans()), router_noise_std=draw(unit(0, 0.1)),
        dispatch=draw(st.sampled_from(DISPATCH_MODES)), pooled_input=draw(st.booleans()),
        temperature=draw(unit(0.01, 1.0)), alpha=draw(unit()),
        regression_loss=draw(st.sampled_from(("smooth_l1", "l2"))), load_balance_loss_weight=draw(unit()),
        direction_schedule=draw(st.sampled_from(("alternating", "joint"))), init_weights=draw(st.booleans()),
    )


METHODS = {"mope": (MoPEConfig, mope_kwargs()), "s3": (S3Config, s3_kwargs()),
           "s3_concepts": (S3Config, s3_concepts_kwargs()), "altmoe": (AltMoEConfig, altmoe_kwargs())}
SMALL = {  # one fixed valid base per method (top_k=1 < num_experts so both bounds of top_k are reachable)
    "mope": dict(num_experts=2, prompt_length=1, static_prompt_length=1, mapped_prompt_length=1,
                 complementary_prompt_length=1, mapper_hidden_size=8, router_self_size=1, router_cross_size=1),
    "s3": dict(design="paper", num_experts=2, latent_size=8, top_k=1, num_heads=2),
    "s3_concepts": dict(design="concepts", num_experts=2, latent_size=8, top_k=1),
    "altmoe": dict(num_experts=2, top_k=1, hidden_size=8),
}


# ---- 1. config validity ----------------------------------------------------------------------------------------
SPECIAL_VALUES = (math.nan, math.inf, -math.inf, -1, 0, 1, 2, -0.0, 0.0, 0.5, 1.0, 1.5, -0.5, 1e308, 5e-324, True,
                  False, None, "1", "nan", [1], 2**64, 10**400, -10**400)


def random_values(rule: Rule):
    """Valid and invalid values alike; the oracle tells which is which."""
    valid = st.sampled_from(rule.choices) if rule.kind == "choice" else st.integers(0, 20) | unit(0, 2)
    return st.one_of(valid, st.integers(), st.floats(), st.text(max_size=3))


def short(value) -> str:
    text = repr(value)
    return text if len(text) < 30 else f"{text[:12]}...({len(text)} chars)"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rules_cover_every_number_field(method):
    cls = METHODS[method][0]
    numbers = {f.name for f in fields(cls) if str(f.type).split(" ")[0] in ("int", "float")}
    assert numbers <= set(RULES[method]), f"fields without a rule here: {sorted(numbers - set(RULES[method]))}"


@pytest.mark.parametrize("method", sorted(METHODS))
@CONFIGS
@given(data=st.data())
def test_config_accepts_valid_values_and_names_the_invalid_field(method, data):
    kwargs = data.draw(METHODS[method][1], label="base")
    check_config(method, kwargs, None)
    changed = data.draw(st.sampled_from(sorted(RULES[method])), label="changed")
    for values in (st.sampled_from(SPECIAL_VALUES), random_values(RULES[method][changed])):
        check_config(method, {**kwargs, changed: data.draw(values, label=changed)}, changed)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_against_every_special_value(method):
    failures = []
    for name in RULES[method]:
        for value in SPECIAL_VALUES:
            try:
                check_config(method, {**SMALL[method], name: value}, name)
            except (Exception, pytest.fail.Exception) as error:  # collect every failure, report them together
                failures.append(f"{name}={short(value)}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


@pytest.mark.parametrize("cls", [MoPEConfig, S3Config, AltMoEConfig], ids=lambda c: c.__name__)
def test_no_float_field_accepts_nan_or_inf(cls):
    for name in [f.name for f in fields(cls) if str(f.type).split(" ")[0] == "float"]:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError) as info:
                cls(**{name: value})
            assert info.value.field == name and name in str(info.value)


# ---- 2. forward and backward on random batches -----------------------------------------------------------------
@st.composite
def batches(draw) -> dict:
    """A batch shape: 1..4 rows of 1..8 tokens, each row's count of real tokens (at least one), the padding side and
    a seed for the pixel values, token ids and everything else the test draws with torch."""
    size, length = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    return {"lengths": draw(st.lists(st.integers(1, length), min_size=size, max_size=size)), "length": length,
            "left_padding": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def make_inputs(shape: dict) -> dict:
    """Images and padded texts of ``shape``; seeds torch's global generator with its seed too."""
    torch.manual_seed(shape["seed"])
    size, length = len(shape["lengths"]), shape["length"]
    mask = torch.zeros(size, length, dtype=torch.long)
    for row, real in enumerate(shape["lengths"]):
        (mask[row, length - real:] if shape["left_padding"] else mask[row, :real]).fill_(1)
    input_ids = torch.randint(3, VOCAB, (size, length)) * mask  # BERT pads with id 0
    return {"pixel_values": torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE), "input_ids": input_ids,
            "attention_mask": mask}


@functools.cache
def base_model(kind: str) -> torch.nn.Module:
    return make_classifier() if kind == "classifier" else make_dual_encoder()


def adapted(kind: str, config) -> peft.PeftModel:
    return peft.get_peft_model(copy.deepcopy(base_model(kind)), config)


def assert_finite(*tensors):
    for tensor in tensors:
        assert torch.isfinite(tensor).all(), tensor


def backward_with_finite_grads(model, loss):
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads
    assert all(torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if not g.isfinite().all()]


@FORWARD
@given(kwargs=mope_kwargs(), shape=batches())
def test_mope_forward_and_backward(kwargs, shape):
    batch = make_inputs(shape)
    model = adapted("classifier", MoPEConfig(**kwargs)).eval()
    size = batch["input_ids"].shape[0]
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (size, 3)
    assert_finite(out.logits)
    if kwargs["num_experts"]:
        routed = len(kwargs["routed_layers"] or range(BLOCKS))
        assert out.routing_weights.shape == (routed, size, kwargs["num_experts"])
        assert_finite(out.routing_weights)
    model.train()
    labels = torch.randint(0, 3, (size,)).index_fill_(0, torch.tensor([0]), 2)  # the highest class always occurs
    backward_with_finite_grads(model, model(**batch, labels=labels).loss)


@FORWARD
@given(kwargs=s3_kwargs(), shape=batches())
@example(kwargs=dict(design="paper", num_experts=2, top_k=None, num_heads=2, latent_size=2, num_layers=2,
                     keep_ratio=5e-324, stage="selection", num_labels=None, ssl_token_drop=0.9),
         shape={"lengths": [1], "length": 1, "left_padding": False, "seed": 0})  # keeps almost nothing, one token
def test_s3_forward_and_backward(kwargs, shape):
    batch = make_inputs(shape)
    model = adapted("classifier", S3Config(**kwargs)).eval()
    size, length = batch["input_ids"].shape
    classes = kwargs["num_labels"] or 3  # None: the base's 3 labels, read by S3's probe; 0: no probe, the base's logits
    experts, width, layers = kwargs["num_experts"], kwargs["latent_size"], kwargs["num_layers"]
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (size, classes)
    assert out.fused_embeds.shape == (size, 2 * width)
    assert out.modality_embeds.shape == (size, 2, width)
    assert out.routing_weights.shape == (2 * layers, size, experts)
    assert out.token_routing_weights.shape == (layers, size, PATCH_TOKENS + length, experts)
    assert_finite(out.logits, out.fused_embeds, out.modality_embeds, out.routing_weights, out.token_routing_weights)
    top_k = kwargs["top_k"] or min(2, experts)
    assert ((out.token_routing_weights > 0).sum(-1) <= top_k).all()  # keep_ratio only drops (token, expert) pairs
    model.train()
    labels = torch.randint(0, classes, (size,)).index_fill_(0, torch.tensor([0]), classes - 1)
    out = model(**batch, labels=labels)
    stage_losses = ("rep_loss", "dsc_loss") if kwargs["stage"] == "specialization" else ("supcon_loss",
                                                                                        "compactness_loss")
    assert_finite(*(out[name] for name in stage_losses))
    backward_with_finite_grads(model, out.loss)


@FORWARD
@given(kwargs=s3_concepts_kwargs(), shape=batches())
def test_s3_concepts_forward_and_backward(kwargs, shape):
    batch = make_inputs(shape)
    model = adapted("classifier", S3Config(**kwargs)).eval()
    size, length = batch["input_ids"].shape
    classes = kwargs["num_labels"] or 3  # None: the base's 3 labels; 0: no S3 head, the base's logits
    if kwargs["num_tasks"] > 1:
        batch["task_ids"] = torch.randint(0, kwargs["num_tasks"], (size,))
    with torch.no_grad():
        out = model(**batch)
    experts, concept = kwargs["num_experts"], kwargs["expert_size"] or kwargs["latent_size"]
    assert out.logits.shape == (size, classes)
    assert out.concept_embeds.shape == (size, experts, concept)
    assert out.routing_weights.shape == (1, size, experts)
    assert out.concept_assignments.shape == (size, PATCH_TOKENS + length, experts)
    assert_finite(out.logits, out.concept_embeds, out.routing_weights, out.concept_assignments)
    model.train()
    labels = torch.randint(0, classes, (size,)).index_fill_(0, torch.tensor([0]), classes - 1)
    backward_with_finite_grads(model, model(**batch, labels=labels).loss)


@FORWARD
@given(kwargs=altmoe_kwargs(), shape=batches())
def test_altmoe_forward_and_backward(kwargs, shape):
    batch = make_inputs(shape)
    model = adapted("dual_encoder", AltMoEConfig(**kwargs)).eval()
    size, width = batch["input_ids"].shape[0], kwargs["hidden_size"]
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.image_embeds.shape == out.text_embeds.shape == (size, 2 * width)
    assert out.logits_per_image.shape == out.logits_per_text.shape == (size, size)
    assert out.loss.ndim == 0
    assert_finite(out.image_embeds, out.text_embeds, out.logits_per_image, out.loss)
    model.train()
    backward_with_finite_grads(model, model(**batch, return_loss=True).loss)


# ---- 3. shape errors -------------------------------------------------------------------------------------------
@functools.cache
def small_altmoe() -> peft.PeftModel:
    return adapted("dual_encoder", AltMoEConfig(**SMALL["altmoe"])).eval()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(images=st.integers(1, 4), texts=st.integers(1, 4))
def test_altmoe_refuses_mismatched_batch_sizes(images, texts):
    assume(images != texts)
    batch = {"pixel_values": torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE),
             "input_ids": torch.randint(3, VOCAB, (texts, 5)), "attention_mask": torch.ones(texts, 5, dtype=torch.long)}
    with pytest.raises(ValueError) as info:
        small_altmoe()(**batch, return_loss=True)
    assert f"batch size {images}" in str(info.value) and f"has {texts}" in str(info.value)


# ---- 4. the size bound -----------------------------------------------------------------------------------------
SIZE_FIELDS = {
    "mope": ("num_experts", "prompt_length", "static_prompt_length", "mapped_prompt_length",
             "complementary_prompt_length", "mapper_hidden_size", "router_self_size", "router_cross_size"),
    "s3": ("num_experts", "latent_size", "expert_hidden_size", "num_layers", "num_labels"),
    "s3_concepts": ("num_experts", "latent_size", "expert_hidden_size", "expert_size", "num_tasks",
                    "task_embedding_size", "num_labels"),
    "altmoe": ("num_experts", "hidden_size", "expert_hidden_size"),
}
KINDS = {"mope": "classifier", "s3": "classifier", "s3_concepts": "classifier", "altmoe": "dual_encoder"}
PREFIXES = {"mope": "mope_", "s3": "s3_", "s3_concepts": "s3_", "altmoe": "altmoe_"}


def assert_refused_before_allocating(method: str, name: str, value: int):
    cls = METHODS[method][0]
    base = copy.deepcopy(base_model(KINDS[method]))
    with pytest.raises(ConfigError) as info:
        peft.get_peft_model(base, cls(**{**SMALL[method], name: value}))
    assert name in str(info.value), str(info.value)
    assert not any(PREFIXES[method] in n for n, _ in base.named_parameters())  # nothing was injected


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=4, deadline=None, derandomize=True)
@given(num_experts=st.integers(2**31, 2**62))
def test_too_many_experts_are_refused_before_allocating(method, num_experts):
    assert_refused_before_allocating(method, "num_experts", num_experts)


@pytest.mark.parametrize("method,name", [(m, n) for m, names in SIZE_FIELDS.items() for n in names[1:]])
def test_any_oversized_field_is_refused_and_named(method, name):
    assert_refused_before_allocating(method, name, 2**40)


# ---- fields checked against the model at injection --------------------------------------------------------------
@pytest.mark.parametrize("method", ["s3", "s3_concepts"])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(token_layer=st.integers(-2 * BLOCKS, 2 * BLOCKS))
def test_s3_token_layer_outside_the_towers_is_a_config_error(method, token_layer):
    config = S3Config(**SMALL[method], token_layer=token_layer)
    if -BLOCKS <= token_layer < BLOCKS:
        adapted("classifier", config)
        return
    with pytest.raises(ConfigError) as info:
        adapted("classifier", config)
    assert info.value.field == "token_layer" and "token_layer" in str(info.value)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(routed_layers=st.none() | st.lists(st.integers(-1, BLOCKS) | st.booleans(), max_size=3))
@example(routed_layers=0)
@example(routed_layers=[0.0])
@example(routed_layers=["0"])
@example(routed_layers=[BLOCKS])
def test_mope_routed_layers_outside_the_tower_are_a_config_error(routed_layers):
    valid = routed_layers is None or (isinstance(routed_layers, list) and routed_layers and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < BLOCKS for i in routed_layers))
    if valid:
        adapted("classifier", MoPEConfig(**SMALL["mope"], routed_layers=routed_layers))
        return
    with pytest.raises(ConfigError) as info:
        adapted("classifier", MoPEConfig(**SMALL["mope"], routed_layers=routed_layers))
    assert info.value.field == "routed_layers" and "routed_layers" in str(info.value)
