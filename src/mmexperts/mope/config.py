"""Configuration of MoPE adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..docstrings import document_fields
from ..errors import ConfigError
from ..registry import MMExpertsPeftType
from ..tuners import TowerAdapterConfig

TOWERS = ("vision", "text")
PROMPT_MODES = ("tokens", "prefix")
HEAD_POOLINGS = ("mean", "summary")


@document_fields
@dataclass
class MoPEConfig(TowerAdapterConfig):
    """Mixture of Prompt Experts: routed, instance-level prompts in every block of a frozen tower.

    The complementary tower is encoded first (with small deep prompts of its own); its [CLS] feature conditions a
    router in each block of the prompted tower, which mixes ``num_experts`` prompt experts into an instance-level
    dynamic prompt, joined by a dataset-level static prompt and a prompt mapped from the complementary feature.
    Defaults follow the official code (K=4, l=6, T=0.1, w_imp=0.01, hinge 0.1).
    """

    renamed_fields = {"router_self_dim": "router_self_size", "router_cross_dim": "router_cross_size"}

    prompted_tower: str = field(default="vision", metadata={
        "help": "Tower that receives routed prompts: 'vision' or 'text'."})
    num_experts: int = field(default=4, metadata={
        "help": "Prompt experts per routed block (K); 0 drops the router and dynamic prompt (plain conditional "
                "deep prompts, the ablation without experts)."})
    prompt_length: int = field(default=6, metadata={"help": "Tokens of the dynamic (routed) prompt."})
    static_prompt_length: int = field(default=6, metadata={
        "help": "Tokens of the dataset-level static prompt; 0 disables it."})
    mapped_prompt_length: int = field(default=1, metadata={
        "help": "Tokens mapped from the complementary feature; 0 disables."})
    mapper_hidden_size: int = field(default=384, metadata={"help": "Hidden width of the two-layer mapper MLP."})
    complementary_prompt_length: int = field(
        default=4, metadata={"help": "Deep prompt tokens in every block of the complementary tower; 0 disables them."})
    router_temperature: float = field(default=0.1, metadata={"help": "Softmax temperature of the router (T)."})
    router_noise_std: float = field(default=1 / 256, metadata={"help": "Std of Gaussian logit noise, training only."})
    router_self_size: int = field(default=2, metadata={"help": "Query size projected from the block's own tokens."})
    router_cross_size: int = field(default=8, metadata={"help": "Query size projected from the complementary feature."})
    importance_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the importance loss in `loss`."})
    importance_threshold: float = field(default=0.1, metadata={"help": "CV² at or below which the loss is zero."})
    routed_layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the prompted tower's blocks that get routed prompts; None = all."})
    prompt_dropout: float = field(default=0.1, metadata={"help": "Dropout on prompts in training."})
    prompt_mode: str = field(default="tokens", metadata={
        "help": "'tokens': prompts are extra tokens each block processes with the real ones and drops after it "
                "(VPT-deep, as the official code); 'prefix': prompts are extra keys/values of each block's "
                "self-attention behind a zero-init per-head gate (the adapter starts as an exact identity)."})
    head_pooling: str | None = field(default=None, metadata={
        "help": "What the classifier head reads from the prompted tower: 'mean' (as the official code) the mean of "
                "its last block's output tokens, the prompt tokens included, after the tower's final norm; "
                "'summary' the tower's own summary ([CLS] or pooler output), as the base model pools it. None: "
                "'mean' for a prompted vision tower with prompt_mode='tokens' (the official code's main tower is "
                "the image encoder), else 'summary' (text towers keep their [CLS]; 'prefix' stays an exact identity "
                "at init). With 'mean' the prompts' outputs reach the head directly; through a frozen [CLS] alone "
                "the fused information arrives late (on real towers: 0.68 against 0.84, near chance after one "
                "epoch)."})
    init_weights: bool = field(
        default=True, metadata={"help": "With prompt_mode='prefix': True zero-inits the prompt gates (an exact "
                                        "identity at init); False draws them at random (for tests)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MMExpertsPeftType.MOPE
        self.check_choice("prompt_mode", PROMPT_MODES)
        self.check_choice("prompted_tower", TOWERS)
        if self.head_pooling is None:
            mean = self.prompt_mode == "tokens" and self.prompted_tower == "vision"
            self.head_pooling = "mean" if mean else "summary"
        self.check_choice("head_pooling", HEAD_POOLINGS)
        self.check_int("prompt_length", 1)
        for name in ("num_experts", "static_prompt_length", "mapped_prompt_length", "complementary_prompt_length",
                     "router_self_size", "router_cross_size", "mapper_hidden_size"):
            self.check_int(name, 0)
        if self.num_experts == 0 and not (self.static_prompt_length or self.mapped_prompt_length):
            raise ConfigError("num_experts", "With num_experts=0 the routed blocks need static_prompt_length or "
                              "mapped_prompt_length > 0; otherwise they would get no prompt at all.")
        if self.num_experts and self.router_self_size + self.router_cross_size < 1:
            raise ConfigError("router_self_size", "router_self_size + router_cross_size must be at least 1; the router "
                              "needs a query.")
        self.check_float("router_temperature", 0, low_open=True)
        for name in ("router_noise_std", "importance_loss_weight", "importance_threshold"):
            self.check_float(name, 0)
        self.check_float("prompt_dropout", 0, 1, high_open=True)
        layers = self.routed_layers
        if layers is not None and (not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)):
            raise ConfigError("routed_layers", f"routed_layers must be a non-empty list of block indices (integers "
                              f">= 0) or None for every block, got {layers!r}.")

    @property
    def complementary_tower(self) -> str:
        """The tower whose feature conditions the routed prompts."""
        return "text" if self.prompted_tower == "vision" else "vision"
