"""The mixture-of-experts core shared by MoPE, S3 and Alt-MoE: routing, expert combination and auxiliary losses."""

from .experts import DISPATCH_MODES, ExpertMLPs
from .losses import cv_squared, importance_loss, switch_balance_loss, z_loss
from .router import Router, RouterOutput, top_k_weights

__all__ = ["ExpertMLPs", "DISPATCH_MODES", "Router", "RouterOutput", "top_k_weights", "cv_squared", "importance_loss", "switch_balance_loss", "z_loss"]
