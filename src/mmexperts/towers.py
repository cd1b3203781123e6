"""Discovery of the vision and text towers of a two-tower model: their blocks, widths, inputs and pooling.

One function, :func:`find_towers`, serves every method. It knows the layouts of ``VisionTextModelForClassification``,
``VisionTextDualEncoderModel``, ``CLIPModel`` and ``SiglipModel`` (and any model holding two ``AutoModel`` towers under
the usual attribute names); when it fails, the error lists what it found.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Feature-sequence models (MultiBench-style) put modality a in the vision slot and modality b in the text slot.
VISION_ATTRIBUTES = ("vision_model", "vision_tower", "vision_encoder", "image_encoder", "visual", "modality_a_model")
TEXT_ATTRIBUTES = ("text_model", "text_encoder", "language_model", "modality_b_model")
BLOCK_LIST_PATHS = ("layers", "encoder.layers", "encoder.layer", "transformer.layers", "transformer.resblocks",
                    "vision_model.encoder.layers")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
VISION_INPUTS = ("pixel_values", "interpolate_pos_encoding")
# Inputs that only qualify a tower's tensors: a call carrying nothing else has none of the tower's inputs.
TOWER_OPTIONS = ("interpolate_pos_encoding",)
# Towers whose model defines their summary as `pooler_output`: CLIP's vision tower (the [CLS] token after its final
# `post_layernorm`) and text tower (the EOS token), SigLIP's attention-pooling head (vision) and last-token head (text).
# The others pool the [CLS] token of their last hidden state: ViT's is already after its final layer norm, and BERT's
# pooler is a tanh dense layer trained for next-sentence prediction (and untrained in sentence encoders), so BERT's
# summary is its [CLS] token.
POOLER_MODEL_TYPES = ("clip_vision_model", "clip_text_model", "siglip_text_model", "siglip_vision_model",
                      "siglip2_text_model", "siglip2_vision_model")
# Vision towers whose summary, without their pooling head (`vision_use_head=False`), is the mean of the patch tokens
# (as their image classifiers pool).
MEAN_WITHOUT_HEAD_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")
# Where a tower that wraps its transformer (CLIPVisionModelWithProjection) keeps the final norm of its summary.
SUMMARY_NORM_PATHS = ("post_layernorm", "vision_model.post_layernorm")
# The norm a tower applies after its last block (ViT's `layernorm`, CLIP's and SigLIP's `post_layernorm`, CLIP text's
# `final_layer_norm`); BERT has none: its blocks end in their own layer norm.
FINAL_NORM_PATHS = (*SUMMARY_NORM_PATHS, "layernorm", "final_layer_norm")

_QUERY_NAMES = ("q_proj", "query")
_KEY_NAMES = ("k_proj", "key")
_VALUE_NAMES = ("v_proj", "value")
_OUT_NAMES = ("o_proj", "out_proj")
_PRE_NORM_NAMES = ("layernorm_before", "layer_norm1", "input_layernorm", "norm1", "ln_1")


class TowerDiscoveryError(ValueError):
    """Raised when a model's vision and text towers or their blocks cannot be identified."""


@dataclass
class Tower:
    """One unimodal tower of a two-tower model."""

    modality: str
    path: str
    module: nn.Module
    blocks_path: str
    blocks: nn.ModuleList
    hidden_size: int
    input_map: dict[str, str]  # the two-tower call's input name -> the tower's own argument name
    pooling: str
    summary_norm: nn.Module | None = None
    final_norm: nn.Module | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs of a two-tower call that this tower consumes."""
        return tuple(self.input_map)

    @property
    def block_names(self) -> list[str]:
        """Fully qualified module names of the tower's blocks, in order."""
        return [f"{self.blocks_path}.{i}" for i in range(len(self.blocks))]

    def pool(self, outputs) -> torch.Tensor:
        """Sequence summary of the tower's output, as its own model defines it (see ``POOLER_MODEL_TYPES``):
        ``pooler`` its ``pooler_output`` (for a tower whose output lacks one, e.g. CLIPVisionModelWithProjection, its
        final norm over the [CLS] token, which is what its pooler returns), ``mean`` the mean of the tokens, ``cls``
        the last-layer [CLS] token."""
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is not None:
                return pooled
            if self.summary_norm is not None:
                return self.summary_norm(outputs.last_hidden_state[:, 0])
        if self.pooling == "mean":
            return outputs.last_hidden_state.mean(1)
        return outputs.last_hidden_state[:, 0]

    def select_inputs(self, inputs: dict) -> dict:
        """The inputs of a two-tower call that this tower consumes, under the tower's own argument names (none when
        the call has none of its tensors, whatever options such as ``interpolate_pos_encoding`` it carries)."""
        selected = {own: inputs[name] for name, own in self.input_map.items() if inputs.get(name) is not None}
        return selected if any(name not in TOWER_OPTIONS for name in selected) else {}


@dataclass
class BlockAnatomy:
    """The self-attention parts of one transformer block that prefix prompts attach to."""

    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear | None
    pre_norm: nn.Module | None
    num_heads: int
    head_dim: int
    scaling: float


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_attribute(model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            return name, child
    for path, child in model.named_modules():  # one level of nesting, e.g. `model.vision_tower`
        if path.count(".") == 1 and path.rsplit(".", 1)[-1] in names:
            return path, child
    return None


def _find_blocks(tower: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for path in BLOCK_LIST_PATHS:
        blocks = _get(tower, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    return None


def _pooling(tower: nn.Module) -> str:
    config = getattr(tower, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type in MEAN_WITHOUT_HEAD_MODEL_TYPES and getattr(config, "vision_use_head", True) is False:
        return "mean"
    return "pooler" if model_type in POOLER_MODEL_TYPES else "cls"


def _summary_norm(tower: nn.Module, paths: tuple[str, ...] = SUMMARY_NORM_PATHS) -> nn.Module | None:
    for path in paths:
        norm = _get(tower, path)
        if isinstance(norm, nn.Module):
            return norm
    return None


@contextmanager
def tower_options(towers: dict[str, Tower], inputs: dict):
    """Hand a call's tower options (``interpolate_pos_encoding``) to each tower that takes them, also when the
    two-tower model's forward drops them (``VisionTextDualEncoderModel`` does); the model's own value wins."""
    handles = []
    for tower in towers.values():
        options = {name: inputs[name] for name in TOWER_OPTIONS
                   if name in tower.input_names and inputs.get(name) is not None}
        if options:
            handles.append(tower.module.register_forward_pre_hook(
                lambda module, args, kwargs, options=options: (args, {**options, **kwargs}), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_map(model: nn.Module, modality: str, tower: nn.Module, candidates: tuple[str, ...]) -> dict[str, str]:
    """Which inputs of a two-tower call go to ``tower``, and under which of its argument names: those the model
    declares in ``tower_inputs[modality]`` (a model whose call names differ from its towers', e.g. ``features_a``),
    else the ``candidates`` the tower's forward takes, under the same names."""
    declared = (getattr(model, "tower_inputs", None) or {}).get(modality)
    if declared is not None:
        return dict(declared)
    parameters = inspect.signature(tower.forward).parameters
    return {name: name for name in candidates if name in parameters}


def _describe(model: nn.Module) -> str:
    children = [name for name, _ in model.named_children()]
    lists = [f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0][:8]
    return f"top-level children {children}; module lists {lists or 'none'}"


def find_towers(model: nn.Module) -> dict[str, Tower]:
    """Find the vision and text towers of ``model``; returns ``{"vision": Tower, "text": Tower}``."""
    found: dict[str, Tower] = {}
    problems = []
    for modality, names, inputs in (("vision", VISION_ATTRIBUTES, VISION_INPUTS),
                                    ("text", TEXT_ATTRIBUTES, TEXT_INPUTS)):
        located = _find_attribute(model, names)
        if located is None:
            problems.append(f"no {modality} tower under any of {list(names)}")
            continue
        path, module = located
        blocks = _find_blocks(module)
        if blocks is None:
            problems.append(f"{modality} tower '{path}' ({type(module).__name__}) has no block list at any of "
                            f"{list(BLOCK_LIST_PATHS)}")
            continue
        blocks_path, block_list = blocks
        hidden_size = getattr(getattr(module, "config", None), "hidden_size", None)
        if hidden_size is None:
            hidden_size = block_anatomy(block_list[0]).query.in_features
        pooling = _pooling(module)
        found[modality] = Tower(modality, path, module, f"{path}.{blocks_path}", block_list, int(hidden_size),
                                _input_map(model, modality, module, inputs), pooling,
                                _summary_norm(module) if pooling == "pooler" else None,
                                _summary_norm(module, FINAL_NORM_PATHS))
    if problems:
        raise TowerDiscoveryError(
            f"Could not find the vision and text towers of {type(model).__name__}: {'; '.join(problems)}. "
            f"Found {_describe(model)}. Use a VisionTextModelForClassification, VisionTextDualEncoderModel, CLIPModel "
            "or SiglipModel, or a model holding its towers as `vision_model` and `text_model`."
        )
    return found


def _first_child(module: nn.Module, names: tuple[str, ...]):
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def block_anatomy(block: nn.Module) -> BlockAnatomy:
    """Locate the self-attention of a transformer block (ViT, BERT, CLIP, SigLIP and look-alikes)."""
    for name, module in block.named_modules():
        query, key, value = (_first_child(module, names) for names in (_QUERY_NAMES, _KEY_NAMES, _VALUE_NAMES))
        if not all(isinstance(p, nn.Linear) for p in (query, key, value)):
            continue
        if "cross" in name:
            continue
        config = getattr(module, "config", None)
        num_heads = (getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
                     or getattr(config, "num_attention_heads", None))
        if num_heads is None:
            break
        head_dim = query.out_features // num_heads
        scaling = getattr(module, "scaling", None) or getattr(module, "scale", None) or head_dim ** -0.5
        return BlockAnatomy(module, query, key, value, _first_child(module, _OUT_NAMES),
                            _first_child(block, _PRE_NORM_NAMES), int(num_heads), head_dim, float(scaling))
    raise TowerDiscoveryError(
        f"Block {type(block).__name__} has no recognisable self-attention (a module with "
        f"{_QUERY_NAMES}/{_KEY_NAMES}/{_VALUE_NAMES} linear layers and a head count); children: "
        f"{[n for n, _ in block.named_children()]}."
    )


def key_padding_mask(attention_mask: torch.Tensor | None, length: int, batch: int, device) -> torch.Tensor:
    """Boolean (batch, length) mask of real tokens, from a 2-D or a block's 4-D (bool or additive) attention mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:  # the last query row sees every key that padding allows, causal or not
        row = attention_mask[:, 0, -1, :]
        return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return attention_mask.bool()


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (batch, length, dim) ``tokens`` over the real ones (``mask`` (batch, length): 1 or True = real)."""
    real = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * real).sum(1) / real.sum(1).clamp_min(1)
