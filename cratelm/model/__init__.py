"""The model family: CRATE-GPT (default), crate-lm, crate-alpha and the GPT-2 baseline."""

from cratelm.model.accounting import count_params, flops_per_token, model_info
from cratelm.model.crate import CrateBlock, CrateLM, make_block
from cratelm.model.diagnostics import coding_rate, layer_diagnostics
from cratelm.model.io import load_crate_gpt_checkpoint

__all__ = ["CrateLM", "CrateBlock", "make_block", "count_params", "flops_per_token", "model_info",
           "coding_rate", "layer_diagnostics", "load_crate_gpt_checkpoint"]
