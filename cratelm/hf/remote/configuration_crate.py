"""Configuration of a CRATE causal language model exported by cratelm (no cratelm import)."""

from transformers import PretrainedConfig


class CrateConfig(PretrainedConfig):
    """CRATE-GPT (arch "crate-gpt"), crate-lm (overcomplete ISTA decoded with the same dictionary)
    or CRATE-alpha ("crate-alpha": a separate decoder and a residual). Field names are cratelm's."""

    model_type = "crate"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "context"}

    def __init__(self, arch="crate-gpt", vocab_size=50257, n_layer=12, n_head=12, d_model=768, context=1024,
                 eta=0.1, lmbda=0.1, overcomplete=1, ista_steps=1, ln_eps=1e-5, vocab_multiple=64,
                 bos_token_id=None, eos_token_id=None, **kwargs):
        if arch not in ("crate-gpt", "crate-lm", "crate-alpha"):
            raise ValueError(f"CrateConfig: arch={arch!r} must be crate-gpt, crate-lm or crate-alpha")
        if d_model % n_head:
            raise ValueError(f"CrateConfig: d_model={d_model} is not a multiple of n_head={n_head}")
        self.arch, self.vocab_size, self.n_layer, self.n_head = arch, vocab_size, n_layer, n_head
        self.d_model, self.context, self.eta, self.lmbda = d_model, context, eta, lmbda
        self.overcomplete, self.ista_steps, self.ln_eps = overcomplete, ista_steps, ln_eps
        self.vocab_multiple = vocab_multiple   # cratelm pads its embedding to a multiple of this
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
