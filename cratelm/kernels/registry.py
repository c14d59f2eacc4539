"""The names of every kernel switch, in one place, without importing torch.

``config.py`` validates ``model.attn_backend`` / ``model.ista_impl`` / ``model.loss_impl``
against these, and the kernels dispatch on them. Adding an attention backend is one entry
in ``ATTENTION`` (plus its module, which exposes ``attention(w, causal)`` and, if it serves
GPT-2, ``attention_qkv(q, k, v, causal)``).
"""

from __future__ import annotations

# attention backend -> module implementing it. `reference` is the ground truth the tests compare to.
ATTENTION: dict[str, str] = {
    "reference": "cratelm.kernels.reference",   # explicit math
    "sdpa": "cratelm.kernels.sdpa",             # torch's fused kernels (the CPU default)
    "flash": "cratelm.kernels.flash",           # the flash-attn package, CUDA
    "triton": "cratelm.kernels.triton_mssa",    # our tied-QKV kernel (CRATE only)
}

# ISTA implementation -> what it is (kernels/ista.py dispatches on the name)
ISTA: dict[str, str] = {
    "torch": "two matmuls, plain autograd",
    "authors": "the authors' three-matmul form (overcomplete dictionaries: same as torch)",
    "fused": "addmm with the shrink in cuBLAS's beta epilogue, hand-written backward",
    "triton": "a Triton GEMM with the shrink/ReLU epilogue, hand-written backward",
    "compile": "torch.compile of the torch form",
}

# LM-head loss implementation -> what it is (kernels/loss.py)
LOSS: dict[str, str] = {
    "plain": "full (N, V) logits and F.cross_entropy",
    "chunked": "fused linear cross-entropy, one chunk of rows at a time (training default)",
    "liger": "Liger-Kernel's Triton fused linear cross-entropy (CUDA)",
}

ATTN_BACKENDS = tuple(ATTENTION)
ISTA_IMPLS = tuple(ISTA)
LOSS_IMPLS = tuple(LOSS)
