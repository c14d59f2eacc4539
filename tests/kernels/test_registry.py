"""One torch-free registry per switch (attention backend, ISTA, loss), used by config and kernels."""

import subprocess
import sys

import pytest
import torch

from cratelm import config
from cratelm.kernels import get_backend, registry
from cratelm.kernels.ista import ista_complete, ista_complete_authors, ista_overcomplete
from cratelm.kernels.loss import lm_head_loss


def test_config_validates_against_the_registry():
    assert (config.ATTN_BACKENDS, config.ISTA_IMPLS, config.LOSS_IMPLS) == (
        registry.ATTN_BACKENDS, registry.ISTA_IMPLS, registry.LOSS_IMPLS)
    for field, value in (("attn_backend", "fast"), ("ista_impl", "fast"), ("loss_impl", "fast")):
        with pytest.raises(config.ConfigError, match=f"model.{field}='fast' is unknown"):
            config.ModelConfig(**{field: value})


def test_registry_and_config_import_no_torch():
    code = "import sys, cratelm.kernels.registry, cratelm.config; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_attention_backend_is_a_module_or_says_why():
    for name in registry.ATTENTION:
        try:
            assert callable(get_backend(name).attention)
        except RuntimeError as e:
            assert f"{name!r} is not available" in str(e)


@pytest.mark.parametrize("impl", [i for i in registry.ISTA_IMPLS if i != "compile"])
def test_every_ista_name_dispatches_in_the_kernels(impl):
    """'authors' is dispatched by kernels/ista.py (model/ista.py only calls the equation)."""
    g = torch.Generator().manual_seed(0)
    z, W = torch.randn(5, 16, generator=g), torch.randn(16, 16, generator=g) / 4
    W4 = torch.randn(64, 16, generator=g) / 4
    want = ista_complete_authors(z.double(), W.double(), 0.1, 0.1)
    torch.testing.assert_close(ista_complete(z, W, 0.1, 0.1, impl=impl).double(), want, rtol=1e-4, atol=1e-5)
    want = ista_overcomplete(z.double(), W4.double(), 0.1, 0.1, 2, impl="torch")
    torch.testing.assert_close(ista_overcomplete(z, W4, 0.1, 0.1, 2, impl=impl).double(), want, rtol=1e-4, atol=1e-5)


def test_every_loss_name_is_known_to_the_loss():
    h, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    for impl in registry.LOSS_IMPLS:
        if impl == "liger":
            with pytest.raises(RuntimeError, match="liger"):
                lm_head_loss(h, w, t, impl=impl)
        else:
            torch.testing.assert_close(lm_head_loss(h, w, t, impl=impl), lm_head_loss(h, w, t))
