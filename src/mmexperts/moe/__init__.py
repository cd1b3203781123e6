"""The mixture-of-experts core shared by MoPE, S3 and Alt-MoE: routing, expert combination and auxiliary losses."""

from .experts import DISPATCH_MODES, ExpertMLPs, TokenMoE, TokenMoEOutput
from .losses import (
    compactness_loss,
    cv_squared,
    importance_loss,
    info_nce,
    supervised_contrastive,
    switch_balance_loss,
    z_loss,
)
from .router import Router, RouterOutput, keep_top_fraction, top_k_weights
from .utility import (
                      UTILITY_CRITERIA,
                      experts_to_prune,
                      gate_mass,
                      gate_output_norm,
                      leave_one_out,
                      prune_lowest,
                      prune_to_sparsity,
                      usage_frequency,
)

__all__ = ["ExpertMLPs", "DISPATCH_MODES", "TokenMoE", "TokenMoEOutput", "Router", "RouterOutput", "keep_top_fraction",
           "top_k_weights",
           "compactness_loss", "cv_squared", "info_nce", "importance_loss", "supervised_contrastive",
           "switch_balance_loss", "z_loss",
           "UTILITY_CRITERIA", "experts_to_prune", "gate_mass", "gate_output_norm", "leave_one_out", "prune_lowest",
           "prune_to_sparsity", "usage_frequency"]
