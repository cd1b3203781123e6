"""PMF-style prompt fusion (Li et al., CVPR 2023, "Efficient Multimodal Fusion via Interactive Prompting") on the
frozen towers of a ``VisionTextModelForClassification``, as a baseline for the real-towers benchmark.

    python benchmarks/pmf.py --self-check

Both towers are frozen. The first L - N blocks of each tower run unimodally without prompts (and without gradient);
the last N (``n_fusion_layers``) are fusion layers, where each frozen block runs twice:

1. query stage: text block([text, t2v_qcp, t2v_qp]); its outputs at the query-prompt positions go through the t2v
   translator (Linear(d_t, h) -> ReLU -> Linear(h, d_v), h = max(d_v, d_t) / 2) to vision width; the vision block
   likewise with v2t_qcp, v2t_qp and the v2t translator;
2. fusion stage: vision block([image, vision_fcp, translated t2v]), text block([text, text_fcp, translated v2t]);
   the appended positions are then dropped.

Prompt positions are always attended; text padding stays masked. The vision summary is the tower's own (CLIP: the
[CLS] token after ``post_layernorm``), the text summary BERT's [CLS] token; each has a linear head and the prediction
is the mean of the two logits. Trained: query prompts (QP), query-context prompts (QCP), fusion-context prompts (FCP),
the translators and both heads; prompts start at N(0, 0.02). The official ``yaoweilee/PMF/PMF.py`` leaves the FCPs
frozen at their random init (its ``grad_control`` checks ``hasattr(self, 'fcp')``, which is never true); here they
are trained, as the paper describes. Prompt lengths may be 0: with none, the block loop is the towers' own forward
(``--self-check`` checks it).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from mmexperts.towers import find_towers


def _prompts(layers: int, length: int, width: int) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.empty(1, length, width).normal_(std=0.02)) for _ in range(layers))


def _translator(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, width_out))


def _run(block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One frozen block, called as its encoder calls it (hidden states, attention mask)."""
    out = block(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


class PMF(nn.Module):
    """PMF-style prompt fusion over the (frozen) vision and text towers of ``base``; its classifier is not used."""

    def __init__(self, base: nn.Module, num_labels: int = 2, n_fusion_layers: int = 2, n_qp: int = 4,
                 n_qcp: int = 4, n_fcp: int = 4, translator_hidden: int | None = None):
        super().__init__()
        self.vision_model, self.text_model = base.vision_model, base.text_model
        self.towers = find_towers(self)
        self.requires_grad_(False)
        vision, text = self.towers["vision"], self.towers["text"]
        if not 0 < n_fusion_layers <= min(len(vision.blocks), len(text.blocks)):
            raise ValueError(f"n_fusion_layers must be in 1..{min(len(vision.blocks), len(text.blocks))}, "
                             f"got {n_fusion_layers}")
        width_v, width_t = vision.hidden_size, text.hidden_size
        hidden = translator_hidden or max(width_v, width_t) // 2
        self.n_fusion_layers, self.n_qp, self.n_qcp, self.n_fcp = n_fusion_layers, n_qp, n_qcp, n_fcp
        self.t2v_qp, self.t2v_qcp = _prompts(n_fusion_layers, n_qp, width_t), _prompts(n_fusion_layers, n_qcp, width_t)
        self.v2t_qp, self.v2t_qcp = _prompts(n_fusion_layers, n_qp, width_v), _prompts(n_fusion_layers, n_qcp, width_v)
        self.vision_fcp = _prompts(n_fusion_layers, n_fcp, width_v)
        self.text_fcp = _prompts(n_fusion_layers, n_fcp, width_t)
        self.t2v_translators = nn.ModuleList(_translator(width_t, hidden, width_v) for _ in range(n_fusion_layers))
        self.v2t_translators = nn.ModuleList(_translator(width_v, hidden, width_t) for _ in range(n_fusion_layers))
        self.vision_head = nn.Linear(width_v, num_labels)
        self.text_head = nn.Linear(width_t, num_labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(("vision_model.", "text_model."))]

    def _text_mask(self, hidden: torch.Tensor, padding: torch.Tensor, extra: int):
        """The text blocks' attention mask (as ``BertModel`` builds it) over ``hidden``: the padding mask, then
        ``extra`` always-attended prompt positions."""
        padding = torch.cat([padding, padding.new_ones(padding.shape[0], extra)], 1)
        return create_bidirectional_mask(config=self.text_model.config, inputs_embeds=hidden, attention_mask=padding)

    def summaries(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None,
                  interpolate_pos_encoding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision and text summaries after the fusion layers."""
        vision, text = self.towers["vision"], self.towers["text"]
        fusion = self.n_fusion_layers
        first_v, first_t = len(vision.blocks) - fusion, len(text.blocks) - fusion
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            image = vision.module.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            pre_norm = getattr(vision.module, "pre_layrnorm", None)
            image = pre_norm(image) if pre_norm is not None else image
            words = text.module.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            mask = self._text_mask(words, attention_mask, 0)
            for block in vision.blocks[:first_v]:
                image = _run(block, image, None)  # CLIP's vision encoder runs without a mask
            for block in text.blocks[:first_t]:
                words = _run(block, words, mask)
        batch, n_image, n_words = image.shape[0], image.shape[1], words.shape[1]
        for i in range(fusion):
            block_v, block_t = vision.blocks[first_v + i], text.blocks[first_t + i]
            t2v_qcp, t2v_qp, v2t_qcp, v2t_qp, vision_fcp, text_fcp = (
                prompts[i].expand(batch, -1, -1) for prompts in (self.t2v_qcp, self.t2v_qp, self.v2t_qcp,
                                                                  self.v2t_qp, self.vision_fcp, self.text_fcp))
            query = torch.cat([words, t2v_qcp, t2v_qp], 1)
            query = _run(block_t, query, self._text_mask(query, attention_mask, self.n_qcp + self.n_qp))
            t2v = self.t2v_translators[i](query[:, n_words + self.n_qcp:])
            query = _run(block_v, torch.cat([image, v2t_qcp, v2t_qp], 1), None)
            v2t = self.v2t_translators[i](query[:, n_image + self.n_qcp:])

            image = _run(block_v, torch.cat([image, vision_fcp, t2v], 1), None)[:, :n_image]
            fused = torch.cat([words, text_fcp, v2t], 1)
            words = _run(block_t, fused, self._text_mask(fused, attention_mask, self.n_fcp + self.n_qp))[:, :n_words]
        return (vision.pool(BaseModelOutput(last_hidden_state=image)),
                text.pool(BaseModelOutput(last_hidden_state=words)))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False) -> SequenceClassifierOutput:
        image, words = self.summaries(pixel_values, input_ids, attention_mask, token_type_ids,
                                      interpolate_pos_encoding)
        logits = (self.vision_head(image) + self.text_head(words)) / 2
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def self_check() -> None:
    """Without prompts the block loop reproduces both towers' own summaries, also with extra text padding; extra
    padding leaves PMF's logits unchanged; only PMF's parameters get gradients."""
    from bench_real_towers import Data, base_model, parse_args

    from mmexperts.offline.real_towers import real_towers

    torch.set_num_threads(1)
    args = parse_args(["--train-size", "16", "--eval-size", "16"])
    paths = real_towers()
    batch = Data(args, paths).test[0]
    extra = 5  # more padding columns: the same rows, longer
    padded = {**batch, **{k: nn.functional.pad(batch[k], (0, extra))
                          for k in ("input_ids", "attention_mask", "token_type_ids")}}
    print(f"batch of {len(batch['labels'])}, text lengths {batch['attention_mask'].sum(1).tolist()}, "
          f"padded to {batch['input_ids'].shape[1]} (+{extra})")
    torch.manual_seed(0)
    base = base_model(paths, args).eval()
    towers = base.towers
    inputs = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "interpolate_pos_encoding")
    with torch.no_grad():
        want_v = towers["vision"].pool(base.vision_model(pixel_values=batch["pixel_values"],
                                                         interpolate_pos_encoding=True))
        want_t = towers["text"].pool(base.text_model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}))
        for name, rows in (("padded batch", batch), (f"+{extra} padding", padded)):
            for fusion in (1, 2):
                bare = PMF(base, n_fusion_layers=fusion, n_qp=0, n_qcp=0, n_fcp=0).eval()
                got_v, got_t = bare.summaries(**{k: rows[k] for k in inputs})
                dv, dt = (got_v - want_v).abs().max().item(), (got_t - want_t).abs().max().item()
                print(f"no prompts, N={fusion}, {name}: max |diff| to the towers' own outputs: vision {dv:.2e}, "
                      f"text {dt:.2e}")
                assert torch.allclose(got_v, want_v, atol=1e-5) and torch.allclose(got_t, want_t, atol=1e-5)
        model = PMF(base).eval()
        logits = model(**{k: batch[k] for k in inputs}).logits
        logits_padded = model(**{k: padded[k] for k in inputs}).logits
        print(f"PMF (N=2) logits, +{extra} padding: max |diff| {(logits - logits_padded).abs().max().item():.2e}")
        assert torch.allclose(logits, logits_padded, atol=1e-5)
    model.train()
    model(**{k: batch[k] for k in (*inputs, "labels")}).loss.backward()
    own = {n for n, p in model.named_parameters() if not n.startswith(("vision_model.", "text_model."))}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == own == trainable, (sorted(with_grad ^ own), sorted(trainable ^ own))
    count = sum(p.numel() for p in model.trainable_parameters())
    towers_count = sum(p.numel() for n, p in model.named_parameters() if n not in own)
    print(f"gradients: exactly the {len(own)} PMF tensors ({count:,} parameters, {100 * count / towers_count:.2f} % "
          f"of the towers' {towers_count:,}); no tower parameter has a gradient")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-check", action="store_true", help="Check the block loop and the gradients.")
    if parser.parse_args().self_check:
        self_check()
