"""White-box diagnostics: what the CRATE paper plots per layer.

Legend: B batch, T tokens, K heads (subspaces), p head width, m dictionary atoms.

Compression. The coding rate of the tokens against layer l's subspaces U_k::

    R^c(Z) = 1/2 sum_k logdet(I_p + p / (N eps^2) X_k^T X_k)

with X_k the N x p matrix of head-k coordinates LN1(Z) U_k^T, each token's head vector
l2-normalised, eps^2 = 0.01 (the authors' hook code), N = T tokens of one sequence (the
set that attention compresses); averaged over the batch. We compute the p x p form (by
Sylvester's identity equal to the N x N one) in float64 through a Cholesky factor.
It is measured on the MSSA input Z and on its output Z' = Z + MSSA(LN1(Z)); their
difference is the compression the layer achieved.

Sparsity. The fraction of exact zeros of the ISTA code (the block output for crate-gpt,
the m-wide code for crate-lm / crate-alpha), and the fraction of code units that are
zero for every token of the batch ("dead").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cratelm.model.crate import CrateBlock, CrateLM

EPS_SQ = 0.01


def coding_rate(u: torch.Tensor, eps_sq: float = EPS_SQ) -> torch.Tensor:
    """R^c of each sequence: u (B, K, T, p) head coordinates -> (B,) in float64."""
    x = torch.nn.functional.normalize(u.double(), dim=-1)          # unit head vectors
    B, K, N, p = x.shape
    gram = x.transpose(-2, -1) @ x                                  # (B, K, p, p)
    eye = torch.eye(p, dtype=torch.float64, device=x.device)
    chol = torch.linalg.cholesky(eye + (p / (N * eps_sq)) * gram)
    logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)    # (B, K)
    return 0.5 * logdet.sum(-1)


def crate_layers(model: CrateLM, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Walk the CRATE blocks on token ids idx (B, T); per layer yield (head coordinates of the
    MSSA input (B, K, T, p), head coordinates of its output, the ISTA code (B, T, d or m))."""
    x = model.embed(idx)
    for block in model.blocks.values():
        assert isinstance(block, CrateBlock)
        u_in = block.mssa.project(block.ln1(x))
        x = x + block.mssa(block.ln1(x))
        code = block.ista.code(block.ln2(x))
        yield u_in, block.mssa.project(block.ln1(x)), code
        x = block.ista.decode(code, x)


@torch.no_grad()
def layer_diagnostics(model: CrateLM, idx: torch.Tensor) -> list[dict[str, float]]:
    """Per-layer compression and sparsity on token ids idx (B, T); plain floats.

    Keys per layer: ``coding_rate_in``, ``coding_rate_out``, ``compression``
    (in - out), ``sparsity``, ``dead_fraction``. gpt2 blocks have no subspaces or
    dictionary: an empty list is returned for that architecture.
    """
    if model.cfg.arch == "gpt2":
        return []
    was_training = model.training
    model.eval()
    out = []
    for u_in, u_out, code in crate_layers(model, idx):
        r_in, r_out = coding_rate(u_in).mean().item(), coding_rate(u_out).mean().item()
        zero = code == 0
        out.append({
            "coding_rate_in": r_in,
            "coding_rate_out": r_out,
            "compression": r_in - r_out,
            "sparsity": zero.float().mean().item(),
            "dead_fraction": zero.reshape(-1, zero.shape[-1]).all(dim=0).float().mean().item(),
        })
    model.train(was_training)
    return out
