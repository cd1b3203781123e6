"""Prompts in a frozen transformer block, two ways (shared by the prompt-based methods).

Prompt tokens placed in front of a block's input and stripped after it (VPT-deep, "replace" style) act on the real
tokens only through the keys and values they add to self-attention, since every other part of a block works token by
token; the prompts' own outputs are dropped.

``with_prompt_tokens`` does exactly that: the block runs over ``[prompts; real tokens]`` (as the official MoPE code),
so prompts and real tokens share one softmax, at the cost of the prompt rows the block computes and drops.

``PrefixAttention`` computes only those extra keys and values, with the block's own normalisation and projections,
attends to them with a softmax of their own and scales them by a per-head gate (LLaMA-Adapter's zero-init attention).
A zero gate makes the block exactly the frozen block; padding masks stay untouched; prompt rows cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .towers import BlockAnatomy, block_anatomy

PREFIX_KWARG = "mmexperts_prefix_prompts"
_ROTARY_KWARGS = ("position_embeddings", "rotary_pos_emb")


def extend_attention_mask(mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """A block's attention mask for ``extra`` prompt tokens placed before its real tokens.

    Every real token may attend to the prompts (also in causal towers, where the prompts come first); the prompts
    attend to each other and to every real token that padding allows (as with a 2-D mask), whatever the tower's
    causality: their outputs never reach a real token. Takes the 2-D (batch, keys) padding mask or a 4-D
    (batch, heads, queries, keys) boolean or additive mask; ``None`` stays ``None``.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], extra), mask], 1)
    if mask.dim() != 4:
        raise ValueError(f"Expected a 2-D or 4-D attention mask, got shape {tuple(mask.shape)}.")
    batch, heads, queries, keys = mask.shape
    is_bool = mask.dtype == torch.bool
    open_value, closed_value = (True, False) if is_bool else (0.0, torch.finfo(mask.dtype).min)
    columns = torch.cat([mask.new_full((batch, heads, queries, extra), open_value), mask], -1)
    if queries == 1:  # one row broadcast over all queries
        return columns
    # the last query row sees every real key (causal or not): the prompts' view of the real tokens
    prompt_rows = torch.cat([mask.new_full((batch, heads, extra, extra), open_value),
                             mask[:, :, -1:, :].expand(batch, heads, extra, keys)], -1)
    return torch.cat([prompt_rows, columns], 2)


def with_prompt_tokens(block: nn.Module, prompts: torch.Tensor, hidden_states: torch.Tensor, args: tuple,
                       kwargs: dict, keep_prompts: Callable[[torch.Tensor], None] | None = None):
    """Call ``block`` on ``[prompts; hidden_states]`` and return its output for the real tokens only; ``keep_prompts``
    receives the block's output for the prompt tokens."""
    rotary = [name for name in _ROTARY_KWARGS if kwargs.get(name) is not None]
    if rotary:
        raise ValueError(f"{type(block).__name__} gets rotary position embeddings ({rotary[0]}), which do not cover "
                         "prompt tokens; use prompt_mode='prefix' for this model.")
    extra = prompts.shape[1]
    tokens = torch.cat([prompts.to(hidden_states.dtype), hidden_states], 1)
    if args:
        args = (extend_attention_mask(args[0], extra), *args[1:])
    elif kwargs.get("attention_mask") is not None:
        kwargs = {**kwargs, "attention_mask": extend_attention_mask(kwargs["attention_mask"], extra)}
    output = block(tokens, *args, **kwargs)
    if keep_prompts is not None:
        keep_prompts((output[0] if isinstance(output, tuple) else output)[:, :extra])
    if isinstance(output, tuple):
        return (output[0][:, extra:], *output[1:])
    return output[:, extra:]


class PrefixAttention:
    """Hooks on one block's self-attention that add the attention over gated prefix prompts passed in ``PREFIX_KWARG``.

    The prompts travel as a keyword argument of the block call, so they survive gradient checkpointing's recompute.
    Where the attention owns an output projection, the prompt context joins the real context at that projection's
    input (one matmul for both); otherwise it is added to the attention's output.
    """

    def __init__(self, block: nn.Module):
        self.anatomy: BlockAnatomy = block_anatomy(block)
        self._query: torch.Tensor | None = None
        self._prefixes = None
        attention = self.anatomy.attention
        self._handles = [
            attention.register_forward_pre_hook(self._arm, with_kwargs=True),
            self.anatomy.query.register_forward_hook(self._keep_query),
            self.anatomy.output.register_forward_pre_hook(self._add_to_projection_input)
            if self.anatomy.output is not None else attention.register_forward_hook(self._add_to_output),
            attention.register_forward_hook(self._disarm),  # registered last, so it runs last
        ]

    def remove(self) -> None:
        """Detach the hooks (when the adapter is unloaded)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _arm(self, module, args, kwargs):
        self._query, self._prefixes = None, kwargs.get(PREFIX_KWARG) or None

    def _keep_query(self, module, args, output):
        if self._prefixes is not None and self._query is None:
            self._query = output

    def _disarm(self, module, args, output):
        self._query = self._prefixes = None

    def _extra_context(self) -> torch.Tensor:
        if self._query is None:
            raise RuntimeError(f"{type(self.anatomy.attention).__name__} did not call its query projection; "
                               "prefix prompts need it.")
        return self.attend(self._query, self._prefixes)

    def _add_to_projection_input(self, module, args):
        if self._prefixes is None:
            return None
        context = args[0]
        return (context + self._extra_context().to(context.dtype), *args[1:])

    def _add_to_output(self, module, args, output):
        if self._prefixes is None:
            return output
        if isinstance(output, tuple):
            return (output[0] + self._extra_context().to(output[0].dtype), *output[1:])
        return output + self._extra_context().to(output.dtype)

    def attend(self, query: torch.Tensor, prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gated attention context (B, L, H*D) of projected queries over each (prompts (B, P, d), gate (H,)) pair."""
        a = self.anatomy
        batch, length, _ = query.shape
        q = query.view(batch, length, a.num_heads, a.head_dim).transpose(1, 2)
        total = None
        for prompts, gate in prefixes:
            prompts = prompts.to(query.dtype)
            normed = a.pre_norm(prompts) if a.pre_norm is not None else prompts
            k = a.key(normed).view(batch, -1, a.num_heads, a.head_dim).transpose(1, 2)
            v = a.value(normed).view(batch, -1, a.num_heads, a.head_dim).transpose(1, 2)
            context = F.scaled_dot_product_attention(q, k, v, scale=a.scaling)
            context = context * gate.to(query.dtype).view(1, -1, 1, 1)
            total = context if total is None else total + context
        return total.transpose(1, 2).reshape(batch, length, -1)
