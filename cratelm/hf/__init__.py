"""Hugging Face bridges: export to / import from transformers, HF tokenizers, lm-eval.

Nothing here is imported by training; each module imports transformers / tokenizers /
lm-eval itself, only when used (``pip install 'cratelm[hf]'``).

- `cratelm.hf.export`: ``cratelm export ... --format hf`` and ``cratelm import-hf``
- `cratelm.hf.convert`: weights and configs between cratelm and transformers; reading a
  transformers directory (``--checkpoint HF_DIR``) without importing transformers
- `cratelm.hf.remote`: the transformers code a CRATE export carries (no cratelm import)
- `cratelm.hf.tokenizer`: a ``tokenizer.json`` wherever a sentencepiece model is accepted,
  and sentencepiece -> ``tokenizer.json`` for exports
- `cratelm.hf.lm_eval_model`: the ``cratelm`` model of lm-evaluation-harness, ``eval --tasks``
"""
