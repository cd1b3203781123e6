"""S3 parts: the concept-expert core (keys, experts, router, heads) and the tower-block wrapper that records tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..context import CallContext
from ..moe import ExpertMLPs, Router, info_nce, switch_balance_loss, z_loss
from ..towers import key_padding_mask, masked_mean
from ..tuners import UnmergeableLayer
from .config import S3Config
from .paper import MoEEncoder, augmented_view


@dataclass
class S3Output:
    """What the core computes for one batch (see :meth:`S3Core.forward`)."""

    concept_embeds: torch.Tensor
    fused_embeds: torch.Tensor
    routing_weights: torch.Tensor
    router_logits: torch.Tensor
    assignments: torch.Tensor
    aux_loss: torch.Tensor
    aux_losses: dict
    logits: torch.Tensor | None = None
    ssl_loss: torch.Tensor | None = None


class S3Core(nn.Module):
    """Specialization, Selection and the task heads of one S3 adapter, over tokens already in the shared space.

    Specialization: token t goes to concept k with ``a_tk = softmax_k(<LN(h_t), c_k> / tau_a)`` (over all K keys, so a
    pruned concept does not hand its tokens to the others); concept k pools ``s_k = sum_t a_tk h_t / sum_t a_tk``
    and its expert MLP gives ``u_k = E_k(s_k)``. Selection: ``g = softmax(router([LN(mean_t h_t); e_task]) / T)``
    over active experts (optionally top-k). Head of task t: ``logits = W_t concat_k(g_k u_k) + b_t`` (or
    ``W_t sum_k g_k u_k``).
    """

    def __init__(self, config: S3Config, num_labels: int, device=None):
        super().__init__()
        d, k = config.latent_size, config.num_experts
        self.config = config
        keys = torch.empty(k, d)
        nn.init.orthogonal_(keys)
        self.keys = nn.Parameter(keys.to(device) if device is not None else keys)
        self.token_norm = nn.LayerNorm(d, device=device)
        self.summary_norm = nn.LayerNorm(d, device=device)
        self.experts = ExpertMLPs(k, d, config.mlp_hidden_size, config.concept_size, dispatch=config.dispatch,
                                  device=device)
        self.task_embedding = nn.Embedding(config.num_tasks, config.task_embedding_size, device=device)
        self.router = Router(d + config.task_embedding_size, k, config.router_temperature, config.router_noise_std,
                             top_k=config.top_k, learn_keys=True, device=device)
        self.num_labels = num_labels
        if num_labels:
            width = k * config.concept_size if config.head_input == "concat" else config.concept_size
            shape = (config.num_tasks, width, num_labels)
            self.head_weight = nn.Parameter(torch.zeros(shape, device=device))
            self.head_bias = nn.Parameter(torch.zeros(config.num_tasks, num_labels, device=device))
            if not config.init_weights:
                nn.init.normal_(self.head_weight, std=0.02)
                nn.init.normal_(self.head_bias, std=0.02)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def ssl_loss_weight(self) -> float:
        """The config's ``ssl_loss_weight``; None (an adapter resolves it when it attaches) resolves by the same rule
        for a standalone core: 1.0 without a head (the self-supervised loss is what trains the experts), else 0.0."""
        if self.config.ssl_loss_weight is not None:
            return self.config.ssl_loss_weight
        return 0.0 if self.num_labels else 1.0

    def check_task_ids(self, task_ids: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Task ids of a call as a (batch,) long tensor; defaults to task 0 for single-task adapters."""
        num_tasks = self.config.num_tasks
        if task_ids is None:
            if num_tasks > 1:
                raise ValueError(f"This S3 adapter serves num_tasks={num_tasks} tasks; pass task_ids (one id in "
                                 f"[0, {num_tasks}) per example) to the forward call.")
            return torch.zeros(batch, dtype=torch.long, device=device)
        task_ids = torch.as_tensor(task_ids, device=device).long().reshape(-1)
        if task_ids.numel() == 1 and batch > 1:
            task_ids = task_ids.expand(batch)
        if task_ids.numel() != batch:
            raise ValueError(f"task_ids must hold one id per example ({batch}), got {task_ids.numel()}.")
        bad = task_ids[(task_ids < 0) | (task_ids >= num_tasks)]
        if bad.numel():
            raise ValueError(f"Unknown task id(s) {sorted(set(bad.tolist()))}: this S3 adapter has num_tasks="
                             f"{num_tasks}, so ids must be in [0, {num_tasks}). Raise num_tasks when creating it.")
        return task_ids

    def assign(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token-to-concept assignments (batch, tokens, K); padding tokens get zero rows."""
        logits = self.token_norm(tokens) @ self.keys.T / self.config.assignment_temperature
        return logits.softmax(-1) * mask[..., None].to(logits.dtype)

    def concepts(self, tokens: torch.Tensor, assignments: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Concept embeddings (batch, K, d_e): expert k runs on concept k of the rows where ``run[:, k]``; else 0."""
        batch, num_experts = run.shape
        alive = run.any(0).nonzero().flatten()
        out = tokens.new_zeros(batch, num_experts, self.config.concept_size)
        if alive.numel() == 0:
            return out
        weights = assignments[..., alive]
        pooled = torch.einsum("btk,btd->bkd", weights, tokens) / weights.sum(1)[..., None].clamp_min(1e-6)
        dispatch = F.one_hot(alive, num_experts).to(tokens.dtype)[None] * run[:, alive, None].to(tokens.dtype)
        embeds = self.experts(pooled, dispatch)
        return out.index_copy(1, alive, embeds)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, expert_mask: torch.Tensor,
                task_ids: torch.Tensor | None = None) -> S3Output:
        """``tokens`` (batch, tokens, d) in the shared space, ``mask`` (batch, tokens) real tokens, ``expert_mask``
        (K,) active experts."""
        config = self.config
        batch = tokens.shape[0]
        tokens = tokens.to(self.keys.dtype)
        task_ids = self.check_task_ids(task_ids, batch, tokens.device)
        summary = masked_mean(tokens, mask)
        query = torch.cat([self.summary_norm(summary), self.task_embedding(task_ids)], -1)
        routed = self.router(query, expert_mask)
        gates = routed.weights
        assignments = self.assign(tokens, mask)
        concepts = self.concepts(tokens, assignments, gates > 0)
        gated = gates[..., None] * concepts
        logits = None
        if self.num_labels:
            features = self.dropout(gated.reshape(batch, -1) if config.head_input == "concat" else gated.sum(1))
            every_task = torch.einsum("bi,tic->btc", features, self.head_weight) + self.head_bias
            logits = every_task[torch.arange(batch, device=tokens.device), task_ids]
        aux_losses = self.aux_losses(assignments, mask, gates, routed.logits, expert_mask)
        weights = {"diversity": config.diversity_loss_weight, "balance": config.balance_loss_weight,
                   "sharpness": config.sharpness_loss_weight, "load_balance": config.load_balance_loss_weight,
                   "z": config.z_loss_weight}
        aux = sum(weights[name] * value for name, value in aux_losses.items())
        ssl = None
        if self.training and self.ssl_loss_weight > 0:
            ssl = self.ssl_loss(tokens, mask, expert_mask)
        return S3Output(concepts, gated.sum(1), gates, routed.logits, assignments, aux, aux_losses, logits, ssl)

    def aux_losses(self, assignments, mask, gates, router_logits, expert_mask) -> dict[str, torch.Tensor]:
        """Unweighted Specialization (diversity, balance, sharpness) and Selection (load balance, z) losses."""
        alive = expert_mask.nonzero().flatten()
        keys = F.normalize(self.keys[alive].float(), dim=-1)
        gram = keys @ keys.T - torch.eye(len(alive), device=keys.device)
        probs = assignments.float()  # padding rows are all zero and add nothing below
        usage = probs[..., alive].sum((0, 1))
        usage = usage / usage.sum().clamp_min(1e-9)
        balance = (usage * (usage.clamp_min(1e-9) * len(alive)).log()).sum()
        sharpness = -(probs * probs.clamp_min(1e-9).log()).sum() / mask.sum().clamp_min(1)
        return {"diversity": gram.pow(2).sum() / len(alive) ** 2, "balance": balance, "sharpness": sharpness,
                "load_balance": switch_balance_loss(gates[:, alive]), "z": z_loss(router_logits[:, alive])}

    def ssl_loss(self, tokens: torch.Tensor, mask: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
        """Per-concept InfoNCE between two views (token dropping + Gaussian noise in the latent space), mean over k."""
        config = self.config
        views = []
        run = expert_mask[None].expand(tokens.shape[0], -1)
        for _ in range(2):
            noisy, keep = augmented_view(tokens, mask, config.ssl_token_drop, config.ssl_noise_std)
            views.append(self.concepts(noisy, self.assign(noisy, keep), run))
        alive = expert_mask.nonzero().flatten().tolist()
        return torch.stack([info_nce(views[0][:, k], views[1][:, k], config.ssl_temperature) for k in alive]).mean()


class S3Layer(UnmergeableLayer, nn.Module, BaseTunerLayer):
    """Wraps the token block of one tower: runs it unchanged and records its output tokens and padding mask.

    Each layer owns its tower's projection to the adapter's width. Paper design: the layer also owns its modality's
    :class:`~mmexperts.s3.paper.MoEEncoder`, and the vision layer the linear probe head. Concepts design: the layer
    owns its modality embedding, and the vision layer the adapter's :class:`S3Core` and its persistent expert mask (a
    buffer saved with the adapter). The model-level hook of :class:`~mmexperts.S3Model` combines both towers.
    """

    adapter_layer_names = ("s3_proj", "s3_modality", "s3_core", "s3_encoder", "s3_head")
    method_name = "S3"
    merge_reason = "S3 concepts are computed from each input's tokens"
    other_param_names = ("s3_expert_mask",)

    def __init__(self, base_layer: nn.Module, context: CallContext, modality: str, hidden_size: int, **kwargs):
        super().__init__()
        self.base_layer = base_layer
        self._context = context
        self.modality = modality
        self.in_features = self.out_features = hidden_size
        self.s3_proj = nn.ModuleDict()
        self.s3_modality = nn.ParameterDict()
        self.s3_core = nn.ModuleDict()
        self.s3_encoder = nn.ModuleDict()
        self.s3_head = nn.ModuleDict()
        self.s3_expert_mask = BufferDict(persistent=True)
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: S3Config, owns_core: bool, num_labels: int) -> None:
        """Create one adapter's projection and encoder (paper) or modality embedding (concepts); in the core (vision)
        layer also its probe head (paper) or concept experts, router, heads and mask (concepts)."""
        device = next(self.base_layer.parameters()).device
        d = config.latent_size
        self.s3_proj[adapter_name] = nn.Sequential(nn.LayerNorm(self.in_features, device=device),
                                                   nn.Linear(self.in_features, d, device=device))
        if config.design == "paper":
            self.s3_encoder[adapter_name] = MoEEncoder(config, device=device)
            if owns_core and num_labels:
                head = nn.Linear(2 * d, num_labels, device=device)
                if config.init_weights:
                    nn.init.zeros_(head.weight)
                    nn.init.zeros_(head.bias)
                self.s3_head[adapter_name] = head
            self.set_adapter(self.active_adapters)
            return
        self.s3_modality[adapter_name] = nn.Parameter(torch.randn(d, device=device) * 0.02)
        if owns_core:
            self.s3_core[adapter_name] = S3Core(config, num_labels, device=device)
            self.s3_expert_mask[adapter_name] = torch.ones(config.num_experts, dtype=torch.bool, device=device)
        self.set_adapter(self.active_adapters)

    def project(self, adapter_name: str, tokens: torch.Tensor) -> torch.Tensor:
        """This tower's tokens at the adapter's width (concepts: in the shared space, with its modality embedding)."""
        projection = self.s3_proj[adapter_name]
        projected = projection(tokens.to(projection[1].weight.dtype))
        return projected + self.s3_modality[adapter_name] if adapter_name in self.s3_modality else projected

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or not any(name in self.s3_proj for name in self.active_adapters):
            return output
        self._context.require(self.method_name)
        tokens = output[0] if isinstance(output, (tuple, list)) else output
        attention_mask = args[0] if args else kwargs.get("attention_mask")
        mask = key_padding_mask(attention_mask, tokens.shape[1], tokens.shape[0], tokens.device)
        self._context.tokens[self.modality] = (tokens, mask)
        return output

    def __repr__(self) -> str:
        return "s3." + super().__repr__()
