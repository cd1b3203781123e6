"""The per-call context a tuner shares with its layers: opened around every forward call of its PeftModel, cleared
after it, so no activation outlives the call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CallContext:
    """What one forward call shares between a tuner and its layers.

    - ``running``: True while the tuner's forward hooks are on; a layer that finds it False was called outside its
      PeftModel (e.g. after ``peft.inject_adapter_in_model``) and refuses to run its adapter.
    - ``inputs``: the call's keyword inputs (``labels``, ``task_ids``...).
    - ``tokens``: modality -> (tokens, mask of real tokens) recorded by the layers that read a tower's tokens.
    - ``complementary``: MoPE's pooled feature of the complementary tower, set before the prompted tower runs.
    - ``mapped``: adapter -> MoPE's prompt mapped from that feature, computed once per call.
    - ``prompt_outputs``: MoPE's last prompted block's output for its prompt tokens (batch, prompts, dim).
    - ``routing``: adapter -> routing weights (batch, K) of each routing site, in call order.
    - ``aux_losses``: adapter -> auxiliary losses of each routing site.
    """

    running: bool = False
    inputs: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    complementary: torch.Tensor | None = None
    mapped: dict = field(default_factory=dict)
    prompt_outputs: torch.Tensor | None = None
    routing: dict = field(default_factory=dict)
    aux_losses: dict = field(default_factory=dict)

    def open(self, inputs: dict) -> None:
        self.clear()
        self.running, self.inputs = True, inputs

    def clear(self) -> None:
        self.running, self.inputs, self.tokens, self.complementary = False, {}, {}, None
        self.mapped, self.routing, self.aux_losses, self.prompt_outputs = {}, {}, {}, None

    def record(self, adapter_name: str, routing: torch.Tensor, aux_loss: torch.Tensor) -> None:
        """Keep one routing site's weights and auxiliary loss."""
        self.routing.setdefault(adapter_name, []).append(routing)
        self.aux_losses.setdefault(adapter_name, []).append(aux_loss)

    def require(self, method_name: str) -> None:
        """Refuse to run an adapter layer outside its PeftModel's call."""
        if not self.running:
            raise ValueError(
                f"{method_name} layers ran outside their PeftModel's forward call, which computes what the layers "
                f"share per call (a sub-model or feature method of the base called directly, or {method_name} layers "
                "injected with peft.inject_adapter_in_model / transformers' load_adapter). Call the model through "
                "its PeftModel (peft.get_peft_model or PeftModel.from_pretrained) with both modalities, e.g. "
                "model(pixel_values=..., input_ids=..., attention_mask=...)."
            )
