"""cratelm: distributed training of CRATE language models with DeepSpeed."""

__version__ = "0.1.0"


def load_crate_gpt_checkpoint(path, device="cpu"):
    """Import a checkpoint saved by the CRATE authors' code; see cratelm.model.io."""
    from cratelm.model.io import load_crate_gpt_checkpoint as _load

    return _load(path, device)
