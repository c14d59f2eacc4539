"""One compiled graph: the attention backend is resolved when the model is built, so
torch.compile traces forward + loss of every architecture without a graph break
(train.compile=true against eager: tests/train/test_distributed.py)."""

import pytest
import torch

from cratelm.config import ModelConfig
from cratelm.model import CrateLM


@pytest.mark.parametrize("arch", ["crate-gpt", "crate-lm", "crate-alpha", "gpt2"])
def test_forward_and_loss_trace_as_one_graph(arch):
    cfg = ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=64, context=16,
                      loss_impl="chunked", ista_impl="torch" if arch == "gpt2" else "fused")
    model = CrateLM(cfg, seed=0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
