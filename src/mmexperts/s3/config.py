"""Configuration of S3 adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..moe import DISPATCH_MODES
from ..registry import MMExpertsPeftType
from ..tuners import TowerAdapterConfig

HEAD_INPUTS = ("concat", "sum")
_POSITIVE_INTS = ("num_experts", "latent_dim", "num_tasks", "task_embedding_dim")
_NON_NEGATIVE_FLOATS = ("router_noise_std", "diversity_loss_weight", "balance_loss_weight", "sharpness_loss_weight",
                        "load_balance_loss_weight", "z_loss_weight", "ssl_noise_std")


@dataclass
class S3Config(TowerAdapterConfig):
    """S3 (Specialization, Selection, Sparsification; Choi & Kwak, ICML 2026) over two frozen towers.

    Both towers' tokens are projected into one shared latent space (plus a modality embedding). ``num_experts`` concept
    experts each own a learnable concept key that attention-pools the tokens assigned to it, and an MLP that turns the
    pooled vector into a concept embedding (**Specialization**). A router conditioned on the input summary and a
    learned task embedding gates the concepts (**Selection**); one linear head per task reads the gated concepts.
    Low-utility experts are pruned through a persistent expert mask saved with the adapter (**Sparsification**).
    The paper's method section was not available: the design is a reconstruction (see ``model_cards/s3.md``).
    """

    num_experts: int = field(default=8, metadata={"help": "Concept experts (K)."})
    latent_dim: int = field(default=64, metadata={"help": "Width of the shared latent space (d)."})
    expert_hidden_dim: int | None = field(default=None, metadata={"help": "Hidden width of each expert MLP; None: 2d."})
    expert_dim: int | None = field(default=None, metadata={"help": "Width of a concept embedding; None: d."})
    assignment_temperature: float = field(default=0.5, metadata={
        "help": "Temperature of the token-to-concept assignment softmax (tau_a)."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the task router."})
    router_noise_std: float = field(default=0.0, metadata={
        "help": "Std of Gaussian router-logit noise, training only."})
    top_k: int | None = field(default=None, metadata={
        "help": "Keep each input's top-k concepts (renormalised); None: soft gating over all active concepts."})
    num_tasks: int = field(default=1, metadata={
        "help": "Tasks sharing the adapter; each has a learned embedding (router input) and its own head. With more "
                "than one task, calls pass `task_ids` (batch,)."})
    task_embedding_dim: int = field(default=16, metadata={"help": "Width of the learned task embedding."})
    num_labels: int | None = field(default=None, metadata={
        "help": "Classes of each task head; None: the base model's num_labels if it has a classifier, else no head "
                "(features only). 0: no head."})
    head_input: str = field(default="concat", metadata={
        "help": "What the task heads read: 'concat' (every gated concept in its own slot) or 'sum' (the fused "
                "gate-weighted sum, one d_e vector)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the gated concept representation."})
    dispatch: str = field(default="sparse", metadata={
        "help": "'sparse': each expert runs only on the concepts routed to it (pruned experts cost nothing); "
                "'dense': every expert on every concept (reference)."})
    diversity_loss_weight: float = field(default=0.1, metadata={"help": "Weight of ||C C^T - I||^2 / K^2 on keys."})
    balance_loss_weight: float = field(default=0.01, metadata={
        "help": "Weight of KL(mean assignment || uniform): balanced concept usage."})
    sharpness_loss_weight: float = field(default=0.01, metadata={
        "help": "Weight of the mean per-token assignment entropy: tokens commit to concepts."})
    load_balance_loss_weight: float = field(default=0.01, metadata={
        "help": "Weight of the Switch router balance loss."})
    z_loss_weight: float = field(default=1e-3, metadata={"help": "Weight of the router z-loss."})
    ssl_loss_weight: float | None = field(default=None, metadata={
        "help": "Weight of the per-concept InfoNCE between two augmented views (training only); > 0 enables the "
                "self-supervised Specialization objective (without labels it is the whole loss). None: 1.0 on a base "
                "without a classifier head (features only: this loss is what trains the experts), else 0.0."})
    ssl_temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature."})
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
        for name in _POSITIVE_INTS:
            self.check_int(name, 1)
        for name in ("expert_hidden_dim", "expert_dim"):
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

    @property
    def hidden_dim(self) -> int:
        """Hidden width of each expert MLP."""
        return self.expert_hidden_dim or 2 * self.latent_dim

    @property
    def concept_dim(self) -> int:
        """Width of one concept embedding."""
        return self.expert_dim or self.latent_dim
