"""Shared fixtures of the Hugging Face tests: tiny exported models, built once per session."""

import glob
import os
import sysconfig

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cratelm.checkpoints import save_model  # noqa: E402
from cratelm.config import ModelConfig  # noqa: E402
from cratelm.data.tokenizer import train_tokenizer_on_texts  # noqa: E402
from cratelm.model import CrateLM  # noqa: E402
from model.test_model import ARCHS, perturb_norms  # noqa: E402,F401 - tests/model (tests/ is on sys.path)


def tiny_model(arch: str, vocab_size: int = 100, context: int = 32, seed: int = 3) -> CrateLM:
    """A random tiny model with LayerNorms and biases moved off (1, 0), so a swapped weight/bias would show."""
    cfg = ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=vocab_size, context=context)
    model = CrateLM(cfg, seed=seed).eval()
    perturb_norms(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_exports(tmp_path_factory):
    """{arch: (cratelm model, cratelm export dir, hf export dir)}: vocab 100 padded to 128 rows,
    exported to transformers by the command line."""
    from cratelm.cli import main

    root = tmp_path_factory.mktemp("hf-exports")
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        src = save_model(model, model.cfg, root / f"{arch}-cratelm")
        dst = root / arch
        assert main(["export", str(src), str(dst), "--format", "hf"]) == 0
        out[arch] = (model, src, dst)
    return out


def stdlib_texts(n: int) -> list[str]:
    """The first n standard-library .py files (the embedded corpus' documents)."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:n]
    return [open(f, encoding="utf-8").read() for f in files]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """(sentencepiece Tokenizer, crate-lm CrateLM, cratelm export dir, HF export dir): cratelm's
    lossless BPE trained on stdlib files, vocab 1024 (no padded rows), context 32."""
    from cratelm.hf.export import save_hf

    root = tmp_path_factory.mktemp("sp-model")
    tok = train_tokenizer_on_texts(stdlib_texts(60), str(root / "tok"), vocab_size=1024)
    model = tiny_model("crate-lm", vocab_size=1024)
    cratelm_dir = save_model(model, model.cfg, root / "cratelm", tokenizer=tok.path)
    return tok, model, cratelm_dir, save_hf(model, root / "hf", tokenizer=tok.path)
