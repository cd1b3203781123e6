"""Configuration of S3 adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..docstrings import document_fields
from ..errors import ConfigError
from ..moe import DISPATCH_MODES
from ..registry import MMExpertsPeftType
from ..tuners import TowerAdapterConfig

DESIGNS = ("paper", "concepts")
STAGES = ("specialization", "selection")
HEAD_INPUTS = ("concat", "sum")
_POSITIVE_INTS = ("num_experts", "latent_size", "num_tasks", "task_embedding_size", "num_layers", "num_heads")
_NON_NEGATIVE_FLOATS = ("router_noise_std", "diversity_loss_weight", "balance_loss_weight", "sharpness_loss_weight",
                        "load_balance_loss_weight", "z_loss_weight", "ssl_noise_std", "rep_loss_weight",
                        "dsc_loss_weight", "supcon_loss_weight", "compactness_loss_weight")
_PAPER_DEFAULT_TOP_K = 2


@document_fields
@dataclass
class S3Config(TowerAdapterConfig):
    """S3 (Specialization, Selection, Sparsification; Choi & Kwak, ICML 2026) over two frozen towers.

    ``design="paper"`` (default), the method as the paper describes it: each tower's tokens are projected to width d
    and encoded by ``num_layers`` pre-norm transformer blocks whose FFN is a token-level top-k mixture of
    ``num_experts`` experts (N = granularity * expansion, ``top_k`` = granularity, see :meth:`from_granularity`); the
    representation is the pair of pooled modality embeddings (``fused_embeds``, read by a linear probe). The loss
    follows ``stage``: ``"specialization"`` (self-supervised: intra-modal InfoNCE between two views, cross-modal
    InfoNCE, load balance) or ``"selection"`` (labels; only the routers train: cross-modal SupCon + compactness).
    ``keep_ratio`` < 1 sparsifies at inference: each MoE layer keeps the top fraction of a batch's (token, expert)
    routing pairs by router score; the residual carries the rest.

    ``design="concepts"``, the earlier reconstruction made before the method section was readable: both towers'
    tokens are projected into one shared latent space (plus a modality embedding). ``num_experts`` concept
    experts each own a learnable concept key that attention-pools the tokens assigned to it, and an MLP that turns the
    pooled vector into a concept embedding (**Specialization**). A router conditioned on the input summary and a
    learned task embedding gates the concepts (**Selection**); one linear head per task reads the gated concepts.
    Low-utility experts are pruned through a persistent expert mask saved with the adapter (**Sparsification**).
    Fields marked (concepts) apply to that design only; fields marked (paper) to the paper design only.
    """

    renamed_fields = {"latent_dim": "latent_size", "expert_hidden_dim": "expert_hidden_size",
                      "expert_dim": "expert_size", "task_embedding_dim": "task_embedding_size"}

    design: str = field(default="paper", metadata={
        "help": "'paper': per-modality MoE encoder layers, three stages, keep-ratio sparsification; 'concepts': the "
                "concept-expert reconstruction with a persistent expert mask."})
    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer (paper: N) or concept experts (K)."})
    latent_size: int = field(default=64, metadata={"help": "Width of the shared latent space (d)."})
    expert_hidden_size: int | None = field(default=None, metadata={
        "help": "Hidden width of each expert MLP; None: paper 4d / top_k (the active experts of a token add up to one "
                "dense 4d FFN), concepts 2d."})
    expert_size: int | None = field(default=None, metadata={
        "help": "(concepts) Width of a concept embedding; None: d."})
    assignment_temperature: float = field(default=0.5, metadata={
        "help": "(concepts) Temperature of the token-to-concept assignment softmax (tau_a)."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router(s)."})
    router_noise_std: float = field(default=0.0, metadata={
        "help": "Std of Gaussian router-logit noise, training only."})
    top_k: int | None = field(default=None, metadata={
        "help": "paper: experts per token (k, the granularity; None: 2, or N if smaller); concepts: keep each input's "
                "top-k concepts (renormalised), None: soft gating over all active concepts."})
    keep_ratio: float = field(default=1.0, metadata={
        "help": "(paper) Fraction of each batch's top-k (token, expert) routing pairs kept per MoE layer, highest "
                "router score first; 1.0: no sparsification. Change it at run time with set_keep_ratio."})
    stage: str = field(default="specialization", metadata={
        "help": "(paper) Which loss `loss` holds: 'specialization' (self-supervised) or 'selection' (labels, "
                "SupCon + compactness; train only selection_parameters()). Change it with set_stage."})
    num_layers: int = field(default=1, metadata={"help": "(paper) MoE encoder layers per modality."})
    num_heads: int = field(default=4, metadata={"help": "(paper) Attention heads of each MoE encoder layer."})
    rep_loss_weight: float = field(default=1.0, metadata={
        "help": "(paper) lambda_rep: intra-modal InfoNCE between two views, mean over the modalities."})
    dsc_loss_weight: float = field(default=1.0, metadata={
        "help": "(paper) lambda_dsc: cross-modal InfoNCE (both directions) between the modality embeddings."})
    supcon_loss_weight: float = field(default=1.0, metadata={"help": "(paper) Weight of the cross-modal SupCon."})
    compactness_loss_weight: float = field(default=1.0, metadata={
        "help": "(paper) Weight of the vMF compactness loss -<mu_x, mu_y> (toward the class-mean direction)."})
    num_tasks: int = field(default=1, metadata={
        "help": "(concepts) Tasks sharing the adapter; each has a learned embedding (router input) and its own head. "
                "With more than one task, calls pass `task_ids` (batch,)."})
    task_embedding_size: int = field(default=16, metadata={"help": "(concepts) Width of the learned task embedding."})
    num_labels: int | None = field(default=None, metadata={
        "help": "Classes of each task head; None: the base model's num_labels if it has a classifier, else no head "
                "(features only). 0: no head."})
    head_input: str = field(default="concat", metadata={
        "help": "(concepts) What the task heads read: 'concat' (every gated concept in its own slot) or 'sum' (the "
                "fused gate-weighted sum, one d_e vector)."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the gated concept representation (concepts) or inside the experts (paper)."})
    dispatch: str = field(default="sparse", metadata={
        "help": "'sparse': each expert runs only on the concepts routed to it (pruned experts cost nothing); "
                "'dense': every expert on every concept (reference)."})
    diversity_loss_weight: float = field(default=0.1, metadata={
        "help": "(concepts) Weight of ||C C^T - I||^2 / K^2 on keys."})
    balance_loss_weight: float = field(default=0.01, metadata={
        "help": "(concepts) Weight of KL(mean assignment || uniform): balanced concept usage."})
    sharpness_loss_weight: float = field(default=0.01, metadata={
        "help": "(concepts) Weight of the mean per-token assignment entropy: tokens commit to concepts."})
    load_balance_loss_weight: float = field(default=0.01, metadata={
        "help": "Weight of the Switch router balance loss (paper: lambda_aux, specialization stage only)."})
    z_loss_weight: float = field(default=1e-3, metadata={"help": "Weight of the router z-loss."})
    ssl_loss_weight: float | None = field(default=None, metadata={
        "help": "(concepts) Weight of the per-concept InfoNCE between two augmented views (training only); > 0 enables "
                "the self-supervised Specialization objective (without labels it is the whole loss). None: 1.0 on a "
                "base without a classifier head (features only: this loss is what trains the experts), else 0.0."})
    ssl_temperature: float = field(default=0.1, metadata={"help": "InfoNCE (and paper: SupCon) temperature."})
    ssl_token_drop: float = field(default=0.2, metadata={"help": "Fraction of tokens each view drops."})
    ssl_noise_std: float = field(default=0.1, metadata={"help": "Gaussian noise added to each view's latent tokens."})
    token_layer: int = field(default=-1, metadata={
        "help": "Index of the block in each tower whose output tokens S3 reads (default: the last block)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: zero-init task heads, so the adapter's logits start at exactly 0 (uniform predictions, a "
                "deterministic start); False: random heads (for tests)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MMExpertsPeftType.S3
        self.check_choice("design", DESIGNS)
        self.check_int("num_experts", 1)
        if self.design == "paper" and self.top_k is None:
            self.top_k = min(_PAPER_DEFAULT_TOP_K, self.num_experts)
        for name in _POSITIVE_INTS:
            self.check_int(name, 1)
        for name in ("expert_hidden_size", "expert_size"):
            self.check_int(name, 1, optional=True)
        self.check_int("num_labels", 0, optional=True)
        self.check_int("top_k", 1, self.num_experts, optional=True)
        for name in ("assignment_temperature", "router_temperature", "ssl_temperature"):
            self.check_float(name, 0, low_open=True)
        for name in _NON_NEGATIVE_FLOATS:
            self.check_float(name, 0)
        if self.ssl_loss_weight is not None:
            self.check_float("ssl_loss_weight", 0)
        for name in ("dropout", "ssl_token_drop"):
            self.check_float(name, 0, 1, high_open=True)
        self.check_choice("head_input", HEAD_INPUTS)
        self.check_choice("dispatch", DISPATCH_MODES)
        self.check_float("keep_ratio", 0, 1, low_open=True)
        self.check_choice("stage", STAGES)
        if self.design == "paper":
            if self.latent_size % self.num_heads:
                raise ConfigError("num_heads", f"num_heads={self.num_heads} must divide latent_size={self.latent_size} "
                                  "(each attention head gets latent_size / num_heads channels); pick a divisor.")
            if self.num_tasks != 1:
                raise ConfigError("num_tasks", f"num_tasks={self.num_tasks}: the paper design has one task (its "
                                  "linear probe); use design='concepts' for task-conditioned routing and heads.")
        else:
            for name, default in (("keep_ratio", 1.0), ("stage", "specialization")):
                if getattr(self, name) != default:
                    raise ConfigError(name, f"{name}={getattr(self, name)!r} belongs to design='paper'; the concepts "
                                      "design sparsifies through its expert mask (prune, set_expert_mask). Use "
                                      f"design='paper' or leave {name} at {default!r}.")

    @classmethod
    def from_granularity(cls, granularity: int, expansion: int, **kwargs) -> S3Config:
        """The paper's parametrisation: ``num_experts = granularity * expansion`` (chi * rho), ``top_k`` = chi."""
        for name, value in (("granularity", granularity), ("expansion", expansion)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"{name} must be a positive integer, got {value!r}.")
        return cls(num_experts=granularity * expansion, top_k=granularity, **kwargs)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Adapters saved before the paper design existed have no ``design`` field: they are concept adapters."""
        if "design" not in kwargs:
            kwargs["design"] = "concepts"
        return super().check_kwargs(**kwargs)

    @property
    def mlp_hidden_size(self) -> int:
        """Hidden width of each expert MLP."""
        if self.expert_hidden_size:
            return self.expert_hidden_size
        return max(1, 4 * self.latent_size // self.top_k) if self.design == "paper" else 2 * self.latent_size

    @property
    def concept_size(self) -> int:
        """Width of one concept embedding."""
        return self.expert_size or self.latent_size
