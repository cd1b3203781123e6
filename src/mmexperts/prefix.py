"""Gated prefix prompts in a frozen transformer block's self-attention (shared by the prompt-based methods).

Prompt tokens placed in front of a block's input and stripped after it (VPT-deep, "replace" style) act on the real
tokens only through the keys and values they add to self-attention, since every other part of a block works token by
token. So prompts enter here as extra keys and values, computed with the block's own normalisation and projections,
attended to with a softmax of their own and scaled by a per-head gate (LLaMA-Adapter's zero-init attention). A zero
gate makes the block exactly the frozen block; padding masks stay untouched; prompt rows cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .towers import BlockAnatomy, block_anatomy

PREFIX_KWARG = "mmexperts_prefix_prompts"


class PrefixAttention:
    """Hooks on one block's self-attention that add the attention over gated prefix prompts passed in ``PREFIX_KWARG``.

    The prompts travel as a keyword argument of the block call, so they survive gradient checkpointing's recompute.
    """

    def __init__(self, block: nn.Module):
        self.anatomy: BlockAnatomy = block_anatomy(block)
        self._query: torch.Tensor | None = None
        attention = self.anatomy.attention
        self._handles = [
            attention.register_forward_pre_hook(self._arm, with_kwargs=True),
            self.anatomy.query.register_forward_hook(self._keep_query),
            attention.register_forward_hook(self._add_prefix_attention, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Detach the hooks (when the adapter is unloaded)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _arm(self, module, args, kwargs):
        self._query = None
        self._armed = bool(kwargs.get(PREFIX_KWARG))

    def _keep_query(self, module, args, output):
        if getattr(self, "_armed", False) and self._query is None:
            self._query = output

    def _add_prefix_attention(self, module, args, kwargs, output):
        prefixes = kwargs.get(PREFIX_KWARG)
        self._armed = False
        if not prefixes:
            return output
        query, self._query = self._query, None
        if query is None:
            raise RuntimeError(f"{type(module).__name__} did not call its query projection; prefix prompts need it.")
        extra = self.attend(query, prefixes)
        if isinstance(output, tuple):
            return (output[0] + extra.to(output[0].dtype), *output[1:])
        return output + extra.to(output.dtype)

    def attend(self, query: torch.Tensor, prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gated attention of projected queries (B, L, H*D) over each (prompts (B, P, d), gate (H,)) pair."""
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
        total = total.transpose(1, 2).reshape(batch, length, -1)
        if a.output is not None:  # the block's output projection is linear: project the extra context, no bias
            total = F.linear(total, a.output.weight)
        return total
