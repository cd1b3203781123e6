"""Configuration of Alt-MoE adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..docstrings import document_fields
from ..errors import ConfigError
from ..moe import DISPATCH_MODES
from ..registry import MMExpertsPeftType
from ..tuners import TowerAdapterConfig

DIRECTIONS = ("vision_to_text", "text_to_vision")
RENAMED_DIRECTIONS = {"image_to_text": "vision_to_text", "text_to_image": "text_to_vision"}  # earlier -> current
DIRECTION_SCHEDULES = ("alternating", "joint")
REGRESSION_LOSSES = ("smooth_l1", "l2")


@document_fields
@dataclass
class AltMoEConfig(TowerAdapterConfig):
    """Alt-MoE / M3-JEPA: one multi-directional mixture-of-experts connector aligning two frozen towers.

    Each direction (vision->text, text->vision) projects its source tower's token features (mean of the last two
    hidden layers) into a shared width, adds a direction embedding, and runs two routings (contrastive and
    regression task embeddings) through ONE shared gate and expert pool; per-direction heads give a contrastive
    embedding (symmetric InfoNCE against a projection of the target tower) and a regression of the target tower's
    pooled latent. Defaults follow the official code (12 experts, top-4 unrenormalised, width 2048, tau 0.03,
    smooth-L1, alpha 0.5, strictly alternating directions).
    """

    renamed_fields = {"schedule": "direction_schedule"}

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
    direction_schedule: str = field(default="alternating", metadata={
        "help": "Which directions train at each optimiser step: 'alternating' (one direction per step, in turn) or "
                "'joint' (the sum of both)."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the gains of the post-expert LayerNorms start at zero, so each routed branch is an exact "
                "residual identity at init; False: reference init (gains one)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MMExpertsPeftType.ALTMOE
        for name in ("num_experts", "hidden_size"):
            self.check_int(name, 1)
        self.check_int("expert_hidden_size", 1, optional=True)
        if isinstance(self.top_k, int) and self.top_k > self.num_experts:
            raise ConfigError("top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}; each token can be "
                              "routed to at most num_experts experts: lower top_k or raise num_experts.")
        self.check_int("top_k", 1)
        self.check_choice("dispatch", DISPATCH_MODES)
        self.check_choice("direction_schedule", DIRECTION_SCHEDULES)
        self.check_choice("regression_loss", REGRESSION_LOSSES)
        self.check_float("temperature", 0, low_open=True)
        self.check_float("alpha", 0, 1)
        self.check_float("dropout", 0, 1, high_open=True)
        for name in ("router_noise_std", "load_balance_loss_weight"):
            self.check_float(name, 0)
