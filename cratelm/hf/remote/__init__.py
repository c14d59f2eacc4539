"""The transformers code a CRATE export ships (copied into the exported directory as is).

``configuration_crate.py`` and ``modeling_crate.py`` import torch and transformers only,
never cratelm: ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads
an exported CRATE model on a machine without cratelm.
"""
