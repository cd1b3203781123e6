"""Configuration of Alt-MoE adapters."""

from __future__ import annotations

from dataclasses import dataclass, field


from ..moe import DISPATCH_MODES
from ..registry import MMExpertsPeftType
from ..tuners import TowerAdapterConfig

DIRECTIONS = ("image_to_text", "text_to_image")
SCHEDULES = ("alternating", "joint")
REGRESSION_LOSSES = ("smooth_l1", "l2")


@dataclass
class AltMoEConfig(TowerAdapterConfig):
    """Alt-MoE / M3-JEPA: one multi-directional mixture-of-experts connector aligning two frozen towers.

    Each direction (image->text, text->image) projects its source tower's token features (mean of the last two
    hidden layers) into a shared width, adds a direction embedding, and runs two routings (contrastive and
    regression task embeddings) through ONE shared gate and expert pool; per-direction heads give a contrastive
    embedding (symmetric InfoNCE against a projection of the target tower) and a regression of the target tower's
    pooled latent. Defaults follow the official code (12 experts, top-4 unrenormalised, width 2048, tau 0.03,
    smooth-L1, alpha 0.5, strictly alternating directions).
    """

    num_experts: int = field(default=12, metadata={"help": "Experts in the shared pool."})
    top_k: int = field(default=4, metadata={"help": "Experts each token is routed to."})
    hidden_size: int = field(default=2048, metadata={"help": "Connector width H (input projections, experts)."})
    expert_hidden_size: int | None = field(default=None, metadata={"help": "Expert MLP inner width; None = H."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout inside the experts (training only)."})
    renormalize: bool = field(default=False, metadata={
        "help": "Renormalise the top-k gate weights to sum to one; the official code keeps the raw softmax values."})
    router_noise_std: float = field(default=0.0, metadata={"help": "Std of Gaussian gate-logit noise in training."})
    dispatch: str = field(default="sparse", metadata={
        "help": "'sparse': each expert runs only on its routed tokens; 'dense': every expert on every token."})
    pooled_input: bool = field(default=False, metadata={
        "help": "Run the connector on the mean-pooled source features instead of on every token (cheaper variant; "
                "the paper routes tokens and pools after)."})
    temperature: float = field(default=0.03, metadata={"help": "Fixed InfoNCE temperature tau."})
    alpha: float = field(default=0.5, metadata={"help": "Loss = alpha * regression + (1 - alpha) * contrastive."})
    regression_loss: str = field(default="smooth_l1", metadata={"help": "'smooth_l1' (code) or 'l2' (paper)."})
    load_balance_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the Switch load-balance loss on the gate (0: none, as in the official code)."})
    schedule: str = field(default="alternating", metadata={
        "help": "Training schedule: 'alternating' (one direction per optimiser step) or 'joint' (sum of both)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the gains of the post-expert LayerNorms start at zero, so each routed branch is an exact "
                "residual identity at init; False: reference init (gains one)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MMExpertsPeftType.ALTMOE
        for name in ("num_experts", "top_k", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.expert_hidden_size is not None and self.expert_hidden_size < 1:
            raise ValueError(f"expert_hidden_size must be a positive integer or None, got {self.expert_hidden_size!r}.")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; each token can be routed to "
                             f"at most num_experts experts: lower top_k or raise num_experts.")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.router_noise_std < 0 or self.load_balance_loss_weight < 0:
            raise ValueError("router_noise_std and load_balance_loss_weight must be >= 0, got "
                             f"{self.router_noise_std} and {self.load_balance_loss_weight}.")
