import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cratelm.config import ModelConfig
from cratelm.evaluate import score_stream, windows
from cratelm.model import CrateLM

C = 16


def tiny_model(seed=0, **kw) -> CrateLM:
    cfg = ModelConfig(**{**dict(n_layer=2, d_model=32, n_head=4, vocab_size=64, context=C), **kw})
    return CrateLM(cfg, seed=seed).eval()


def brute_force(model, tokens, C, S) -> tuple[float, int]:
    """Token i is predicted by the first window (start kS) whose targets reach it:
    k = max(0, ceil((i - C) / S)), context t[kS .. i-1]; float64, one token at a time."""
    model = model.double()
    t = torch.as_tensor(tokens, dtype=torch.long)
    total = 0.0
    for i in range(1, len(t)):
        k = max(0, math.ceil((i - C) / S))
        assert i - k * S <= C and (S == C or i - k * S >= C - S or k == 0)
        logits = model(t[None, k * S:i])[0, -1]
        total -= torch.log_softmax(logits, -1)[t[i]].item()
    model.float()
    return total, len(t) - 1


@pytest.mark.parametrize("stride", [C, 5, 1])
def test_windows_score_every_token_once(stride):
    for n in (2, 15, 16, 17, 50, 64):
        scored = []
        for begin, end, first in windows(n, C, stride):
            assert end - begin <= C
            scored += list(range(begin + 1 + first, end + 1))
        assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [C, 7])
def test_eval_equals_brute_force_loop(stride):
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 64, size=61)    # 61 is not a multiple of 16
    want, n_want = brute_force(model, tokens, C, stride)
    got, n = score_stream(model.double(), tokens, C, stride, batch_size=3)
    assert n == n_want == 60
    assert got / n == pytest.approx(want / n_want, abs=1e-6)


def test_uniform_logits_give_perplexity_equal_to_vocab():
    model = tiny_model(vocab_size=128)
    with torch.no_grad():
        model.embed.wte.weight.zero_()         # tied head: every logit is 0
    tokens = np.random.default_rng(1).integers(0, 128, size=40)
    nll, n = score_stream(model, tokens, C, C)
    assert math.exp(nll / n) == pytest.approx(128, rel=1e-6)


def test_padded_vocabulary_rows_are_not_in_the_softmax():
    """vocab 50 is padded to 64 rows; eval normalises over the 50 real tokens only, and
    generation never samples a padded id."""
    model = tiny_model(vocab_size=50)
    assert model.cfg.padded_vocab == 64
    tokens = np.random.default_rng(2).integers(0, 50, size=C + 1)
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        logits = model.double()(t[None, :-1])[0, :, :50]
    want = -torch.log_softmax(logits, -1).gather(1, t[1:, None]).sum().item()
    got, n = score_stream(model, tokens, C, C)
    assert n == C and got == pytest.approx(want, rel=1e-9)
    with torch.no_grad():
        model.embed.wte.weight[50:] = 100.0                # padded rows would win every argmax
    out = model.float().generate(t[None, :4], 8, temperature=0)
    assert int(out.max()) < 50


def test_raw_text_is_read_as_bytes(tmp_path):
    """CRLF and lone CR are scored as they are in the file, and bits-per-byte counts its bytes."""
    from cratelm.evaluate import load_tokens

    class Bytes:        # a byte-level tokenizer: one id per UTF-8 byte
        eos_id = 256

        def encode(self, text):
            return list(text.encode("utf-8"))

    raw = "line one\r\nline two\rend é\n".encode()
    (tmp_path / "t.txt").write_bytes(raw)
    ids, n_bytes, _ = load_tokens(str(tmp_path / "t.txt"), Bytes(), {})
    assert n_bytes == len(raw) == 26
    assert ids.tolist() == list(raw) + [256]
