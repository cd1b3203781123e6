"""S3 as the paper describes it: per-modality encoders of pre-norm transformer blocks whose FFN is a token-level
top-k mixture of experts (the shared :class:`~mmexperts.moe.TokenMoE`), and the losses of its two training stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import TokenMoE, compactness_loss, info_nce, supervised_contrastive, switch_balance_loss, z_loss
from ..towers import masked_mean
from .config import S3Config


def augmented_view(tokens: torch.Tensor, mask: torch.Tensor, token_drop: float, noise_std: float):
    """One augmented view of latent tokens: each real token dropped with probability ``token_drop`` (rows keep at
    least their real tokens if all would go), plus Gaussian noise. Returns (tokens, mask)."""
    keep = mask.bool() & (torch.rand(mask.shape, device=tokens.device) >= token_drop)
    keep = torch.where(keep.any(1, keepdim=True), keep, mask.bool())
    return tokens + noise_std * torch.randn_like(tokens), keep


class MoEEncoderBlock(nn.Module):
    """``x + Attn(LN(x))`` then ``x + MoE(LN(x))`` over the real tokens; padding is masked out of attention and never
    routed."""

    def __init__(self, config: S3Config, device=None):
        super().__init__()
        d = config.latent_size
        self.num_heads = config.num_heads
        self.attention_norm = nn.LayerNorm(d, device=device)
        self.qkv = nn.Linear(d, 3 * d, device=device)
        self.attention_out = nn.Linear(d, d, device=device)
        self.moe_norm = nn.LayerNorm(d, device=device)
        self.moe = TokenMoE(config.num_experts, d, config.mlp_hidden_size, top_k=config.top_k,
                            temperature=config.router_temperature, noise_std=config.router_noise_std,
                            dropout=config.dropout, dispatch=config.dispatch, device=device)

    def forward(self, x: torch.Tensor, real: torch.Tensor, keep_ratio: float):
        batch, length, width = x.shape
        heads = self.qkv(self.attention_norm(x)).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], attn_mask=real[:, None, None, :])
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, width))
        routed = self.moe(self.moe_norm(x)[real], keep_ratio)
        mixed = routed.output.new_zeros(batch, length, width)  # the experts' dtype, which autocast may lower
        mixed[real] = routed.output
        return x + mixed, routed


@dataclass
class EncoderOutput:
    """One modality through its MoE encoder: pooled embedding (batch, d), per block the kept token routing weights
    (batch, tokens, N; zero on padding) and the router logits of the real tokens (real tokens, N)."""

    pooled: torch.Tensor
    weights: list[torch.Tensor]
    logits: list[torch.Tensor]


class MoEEncoder(nn.Module):
    """``num_layers`` :class:`MoEEncoderBlock` s and a final LayerNorm; the embedding is the mean over real tokens."""

    def __init__(self, config: S3Config, device=None):
        super().__init__()
        self.blocks = nn.ModuleList(MoEEncoderBlock(config, device=device) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.latent_size, device=device)

    def router_parameters(self) -> list[nn.Parameter]:
        """The routers' parameters (what the Selection stage trains)."""
        return [p for block in self.blocks for p in block.moe.router.parameters()]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, keep_ratio: float = 1.0) -> EncoderOutput:
        real = mask.bool()
        weights, logits = [], []
        x = tokens
        for block in self.blocks:
            x, routed = block(x, real, keep_ratio)
            full = routed.weights.new_zeros(*real.shape, routed.weights.shape[-1])
            full[real] = routed.weights
            weights.append(full)
            logits.append(routed.logits)
        return EncoderOutput(masked_mean(self.norm(x), real), weights, logits)


@dataclass
class PaperOutput:
    """What the paper design computes for one adapter in one call (see :class:`~mmexperts.S3Model`)."""

    fused_embeds: torch.Tensor
    modality_embeds: torch.Tensor
    routing_weights: torch.Tensor
    token_routing_weights: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None
    losses: dict = field(default_factory=dict)
    stage_loss: torch.Tensor | None = None

    def fields(self) -> dict:
        """The output fields of this adapter."""
        fields = {"fused_embeds": self.fused_embeds, "modality_embeds": self.modality_embeds,
                  "routing_weights": self.routing_weights, "token_routing_weights": self.token_routing_weights}
        if self.stage_loss is not None:
            fields.update(self.losses, stage_loss=self.stage_loss)
        return fields


def routing_aux_loss(outputs: list[EncoderOutput], config: S3Config) -> torch.Tensor:
    """lambda_aux times the Switch balance loss plus the z-loss weight times the router z-loss, mean over every MoE
    layer of both modalities (real tokens only)."""
    terms = []
    for output in outputs:
        for logits in output.logits:
            if logits.shape[0]:
                terms.append(config.load_balance_loss_weight * switch_balance_loss(logits.softmax(-1))
                             + config.z_loss_weight * z_loss(logits))
    return torch.stack(terms).mean() if terms else outputs[0].pooled.new_zeros(())


def specialization_losses(encode, tokens: dict, clean: dict[str, torch.Tensor], config: S3Config) -> dict:
    """Stage 1 (unweighted): ``rep_loss``, intra-modal InfoNCE between two augmented views, mean over the modalities;
    ``dsc_loss``, cross-modal InfoNCE (both directions) between the clean modality embeddings.

    ``encode(modality, tokens, mask)`` runs a modality's encoder; ``tokens`` maps modality -> (tokens, mask)."""
    rep = []
    for modality, (latent, mask) in tokens.items():
        views = [encode(modality, *augmented_view(latent, mask, config.ssl_token_drop, config.ssl_noise_std)).pooled
                 for _ in range(2)]
        rep.append(info_nce(views[0], views[1], config.ssl_temperature))
    vision, text = clean.values()
    return {"rep_loss": torch.stack(rep).mean(), "dsc_loss": info_nce(vision, text, config.ssl_temperature)}


def selection_losses(clean: dict[str, torch.Tensor], labels: torch.Tensor, config: S3Config) -> dict:
    """Stage 2 (unweighted): ``supcon_loss``, cross-modal supervised contrastive loss (both directions);
    ``compactness_loss``, vMF compactness of each modality's embeddings, mean over the modalities."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != next(iter(clean.values())).shape[0]:
        raise ValueError(f"The selection stage needs one integer class label per example (shape (batch,)), got labels "
                         f"of shape {tuple(labels.shape)} and dtype {labels.dtype}. Multi-label or regression "
                         "targets have no classes to contrast: binarise them first (e.g. MultiBench's sign of the "
                         "sentiment score).")
    vision, text = clean.values()
    return {"supcon_loss": supervised_contrastive(vision, text, labels, config.ssl_temperature),
            "compactness_loss": (compactness_loss(vision, labels) + compactness_loss(text, labels)) / 2}


def weighted_stage_loss(losses: dict, config: S3Config) -> torch.Tensor:
    """The stage's losses weighted by their config weights."""
    weights = {"rep_loss": config.rep_loss_weight, "dsc_loss": config.dsc_loss_weight,
               "supcon_loss": config.supcon_loss_weight, "compactness_loss": config.compactness_loss_weight}
    return sum(weights[name] * value for name, value in losses.items())
