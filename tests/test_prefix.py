"""Prompts in a frozen block (``mmexperts.prefix``): gated prefix attention (a zero gate is the frozen block exactly, a
softmax of its own per prompt set, per-head gates, padding untouched, no state between calls, hooks that detach) and
prompt tokens run through the block (masks extended, prompt rows dropped, tuple outputs kept, rotary refused)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmexperts.prefix import PREFIX_KWARG, PrefixAttention, extend_attention_mask, with_prompt_tokens
from mmexperts.towers import find_towers

from conftest import HIDDEN, MODEL_FACTORIES

HEADS, LENGTH, PROMPTS = 4, 6, 3
MIN = torch.finfo(torch.float32).min


def block_of(layout: str, modality: str) -> nn.Module:
    """The first block of a tiny tower: ViT (``classifier`` vision), BERT (``classifier`` text) or CLIP (``clip``)."""
    return find_towers(MODEL_FACTORIES[layout]())[modality].blocks[0]


# ViT and CLIP attentions own their output projection (the prompt context joins its input); BERT's self-attention
# does not (the context is added to its output).
BLOCKS = [("classifier", "vision"), ("classifier", "text"), ("clip", "vision")]
IDS = ["vit", "bert", "clip"]


def tensors(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded hidden states (batch, LENGTH, HIDDEN) and prompts (batch, PROMPTS, HIDDEN)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, LENGTH, HIDDEN, generator=generator),
            torch.randn(batch, PROMPTS, HIDDEN, generator=generator))


def call(block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None = None, prefixes=None) -> torch.Tensor:
    """The block's hidden states output, with ``prefixes`` passed the way MoPE passes them (a keyword argument)."""
    kwargs = {PREFIX_KWARG: prefixes} if prefixes is not None else {}
    output = block(hidden, mask, **kwargs)  # CLIP's blocks take their mask (None: no padding) positionally
    return output[0] if isinstance(output, tuple) else output


def padding_mask(real: list[int]) -> torch.Tensor:
    """An additive (batch, 1, 1, LENGTH) mask keeping the first ``real[i]`` tokens of row i."""
    keep = torch.arange(LENGTH)[None, :] < torch.tensor(real)[:, None]
    return torch.zeros(len(real), 1, 1, LENGTH).masked_fill(~keep[:, None, None, :], MIN)


@pytest.mark.parametrize("layout, modality", BLOCKS, ids=IDS)
def test_a_zero_gate_leaves_the_block_exactly_the_frozen_block(layout, modality):
    block = block_of(layout, modality).eval()
    hidden, prompts = tensors()
    with torch.no_grad():
        frozen = call(block, hidden)
        PrefixAttention(block)
        assert torch.equal(call(block, hidden), frozen)  # hooks alone change nothing
        assert torch.equal(call(block, hidden, prefixes=[(prompts, torch.zeros(HEADS))]), frozen)
        gated = call(block, hidden, prefixes=[(prompts, torch.ones(HEADS))])
    assert gated.shape == frozen.shape  # prefix prompts add no rows
    assert not torch.allclose(gated, frozen)


def test_a_zero_gate_learns_first_the_gate_gets_a_gradient_the_prompts_none():
    block = block_of("classifier", "vision").eval()
    PrefixAttention(block)
    hidden, prompts = tensors()
    prompts.requires_grad_(True)
    gate = torch.zeros(HEADS, requires_grad=True)
    call(block, hidden, prefixes=[(prompts, gate)]).square().sum().backward()
    assert gate.grad is not None and (gate.grad != 0).all()
    assert torch.equal(prompts.grad, torch.zeros_like(prompts))


@pytest.mark.parametrize("layout, modality", BLOCKS, ids=IDS)
def test_attend_is_a_softmax_over_the_prompts_keys_and_values_from_the_blocks_own_norm_and_projections(layout,
                                                                                                        modality):
    block = block_of(layout, modality).eval()
    prefix = PrefixAttention(block)
    a = prefix.anatomy
    hidden, prompts = tensors()
    gate = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        query = a.query(hidden)
        context = prefix.attend(query, [(prompts, gate)])
        normed = a.pre_norm(prompts) if a.pre_norm is not None else prompts
        q, k, v = (t.view(2, -1, HEADS, a.head_dim).transpose(1, 2) for t in (query, a.key(normed), a.value(normed)))
        weights = torch.softmax(q @ k.transpose(-1, -2) * a.scaling, -1)  # (batch, heads, LENGTH, PROMPTS)
        expected = (weights @ v * gate.view(1, -1, 1, 1)).transpose(1, 2).reshape(2, LENGTH, HIDDEN)
    assert context.shape == (2, LENGTH, HIDDEN)
    torch.testing.assert_close(context, expected)
    assert torch.equal(context.view(2, LENGTH, HEADS, a.head_dim)[:, :, 3], torch.zeros(2, LENGTH, a.head_dim))


def test_each_prompt_set_has_a_softmax_of_its_own_and_their_contexts_add():
    prefix = PrefixAttention(block_of("classifier", "vision").eval())
    hidden, first = tensors(0)
    _, second = tensors(1)
    first_gate, second_gate = torch.ones(HEADS), torch.full((HEADS,), 0.5)
    with torch.no_grad():
        query = prefix.anatomy.query(hidden)
        both = prefix.attend(query, [(first, first_gate), (second, second_gate)])
        torch.testing.assert_close(both, prefix.attend(query, [(first, first_gate)])
                                   + prefix.attend(query, [(second, second_gate)]))
        joint = prefix.attend(query, [(torch.cat([first, second], 1), first_gate)])
    assert not torch.allclose(both, joint)


@pytest.mark.parametrize("layout, modality", [("classifier", "text"), ("clip", "vision")], ids=["bert", "clip"])
def test_padded_keys_stay_masked_under_prefix_prompts(layout, modality):
    block = block_of(layout, modality).eval()
    PrefixAttention(block)
    hidden, prompts = tensors(batch=1)
    prefixes = [(prompts, torch.ones(HEADS))]
    real = 4
    poisoned = hidden.clone()
    poisoned[:, real:] = 50.0
    with torch.no_grad():
        padded = call(block, hidden, padding_mask([real]), prefixes=prefixes)
        assert torch.equal(call(block, poisoned, padding_mask([real]), prefixes=prefixes)[:, :real], padded[:, :real])
        trimmed = call(block, hidden[:, :real], prefixes=prefixes)  # the same row without its padding
    torch.testing.assert_close(padded[:, :real], trimmed, rtol=1e-5, atol=1e-6)


def test_prompts_act_only_in_the_call_that_carries_them_and_remove_detaches_the_hooks():
    block = block_of("classifier", "vision").eval()
    prefix = PrefixAttention(block)
    hidden, prompts = tensors()
    prefixes = [(prompts, torch.ones(HEADS))]
    with torch.no_grad():
        frozen = call(block, hidden)
        prompted = call(block, hidden, prefixes=prefixes)
        assert torch.equal(call(block, hidden), frozen)  # nothing left over from the prompted call
        assert torch.equal(call(block, hidden, prefixes=prefixes), prompted)
        assert torch.equal(call(block, hidden, prefixes=[]), frozen)  # an empty list is no prompts
        prefix.remove()
        assert torch.equal(call(block, hidden, prefixes=prefixes), frozen)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in block.modules())


@pytest.mark.parametrize("layout, modality", BLOCKS, ids=IDS)
def test_prompt_tokens_run_with_the_real_tokens_and_their_rows_are_dropped(layout, modality):
    block = block_of(layout, modality).eval()
    hidden, prompts = tensors()
    kept = []
    with torch.no_grad():
        output = with_prompt_tokens(block, prompts, hidden, (None,), {}, keep_prompts=kept.append)
        whole = call(block, torch.cat([prompts, hidden], 1))
    output = output[0] if isinstance(output, tuple) else output
    assert output.shape == hidden.shape
    torch.testing.assert_close(output, whole[:, PROMPTS:], rtol=0, atol=0)
    (prompt_rows,) = kept
    torch.testing.assert_close(prompt_rows, whole[:, :PROMPTS], rtol=0, atol=0)
    assert not torch.allclose(output, call(block, hidden))  # the prompts reach the real tokens


def test_prompt_tokens_leave_padded_rows_equal_to_their_unpadded_selves():
    block = block_of("classifier", "text").eval()
    hidden, prompts = tensors(batch=1)
    real = 4
    with torch.no_grad():
        padded = with_prompt_tokens(block, prompts, hidden, (padding_mask([real]),), {})
        poisoned = hidden.clone()
        poisoned[:, real:] = 50.0
        as_kwarg = with_prompt_tokens(block, prompts, poisoned, (), {"attention_mask": padding_mask([real])})
        trimmed = with_prompt_tokens(block, prompts, hidden[:, :real], (), {})
    assert torch.equal(as_kwarg[:, :real], padded[:, :real])
    torch.testing.assert_close(padded[:, :real], trimmed, rtol=1e-5, atol=1e-6)


class Recorder(nn.Module):
    """A block that records its inputs and returns (hidden states * 2, an extra output)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        self.calls.append((hidden_states, attention_mask, kwargs))
        return hidden_states * 2, "extra"


def test_prompt_tokens_extend_a_positional_or_keyword_mask_and_keep_tuple_outputs():
    hidden, prompts = tensors()
    mask = torch.tensor([[1] * LENGTH, [1] * 4 + [0] * 2])
    for args, kwargs in (((mask,), {}), ((), {"attention_mask": mask, "output_attentions": False})):
        block = Recorder()
        output = with_prompt_tokens(block, prompts, hidden, args, kwargs)
        (tokens, received, extra_kwargs), = block.calls
        assert torch.equal(tokens, torch.cat([prompts, hidden], 1))
        assert torch.equal(received, torch.cat([torch.ones(2, PROMPTS, dtype=mask.dtype), mask], 1))
        assert extra_kwargs == {k: v for k, v in kwargs.items() if k != "attention_mask"}
        assert isinstance(output, tuple) and output[1] == "extra"
        assert torch.equal(output[0], hidden * 2)
    block = Recorder()
    with_prompt_tokens(block, prompts, hidden, (), {"attention_mask": None})
    assert block.calls[0][1] is None  # no mask stays no mask


def test_prompt_tokens_refuse_rotary_position_embeddings_and_point_to_prefix_mode():
    hidden, prompts = tensors()
    for name in ("position_embeddings", "rotary_pos_emb"):
        with pytest.raises(ValueError, match=rf"Recorder gets rotary position embeddings \({name}\).*"
                                             r"prompt_mode='prefix'"):
            with_prompt_tokens(Recorder(), prompts, hidden, (), {name: (torch.ones(1), torch.ones(1))})
    with_prompt_tokens(Recorder(), prompts, hidden, (), {"position_embeddings": None})  # None is no rotary


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_single_row_4d_mask_gains_open_prompt_columns_in_its_own_dtype(dtype):
    keep = torch.tensor([[True, True, False]])[:, None, None, :]
    mask = keep if dtype == torch.bool else torch.zeros(1, 1, 1, 3).masked_fill(~keep, MIN)
    extended = extend_attention_mask(mask, 2)
    assert extended.shape == (1, 1, 1, 5) and extended.dtype == dtype
    open_value = True if dtype == torch.bool else 0.0
    assert extended[..., :2].eq(open_value).all()
    assert torch.equal(extended[..., 2:], mask)
