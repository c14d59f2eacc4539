"""lm-evaluation-harness through the `cratelm` model: the rolling window rule against
`cratelm eval`'s, and the same scores as lm-eval's own `hf` model on the exported model,
on local task YAMLs (dataset_path: json; nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch

from cratelm.cli import main
from cratelm.evaluate import score_stream

from .conftest import stdlib_texts

C = 32                                          # the tiny model's context


@pytest.fixture(scope="module")
def lms(sp_model):
    """(the cratelm lm-eval model on the cratelm export, lm-eval's HFLM on the HF export)."""
    from lm_eval.api.registry import get_model

    import cratelm.hf.lm_eval_model  # noqa: F401 - registers "cratelm"

    _, _, cratelm_dir, hf_dir = sp_model
    ours = get_model("cratelm")(checkpoint=str(cratelm_dir), batch_size=4, device="cpu")
    theirs = get_model("hf")(pretrained=str(hf_dir), trust_remote_code=True, batch_size=4, device="cpu",
                             dtype="float32")
    return ours, theirs


def rolling(lm, texts):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                    disable_tqdm=True)


def prefix_with_tokens(tok, text, n):
    """The shortest prefix of text that encodes to exactly n tokens."""
    for end in range(1, len(text)):
        if len(tok.encode(text[:end])) == n:
            return text[:end]
    raise AssertionError(f"no prefix of {n} tokens")


def test_loglikelihood_rolling_is_cratelm_evals_window_rule(sp_model, lms):
    tok, model, _, _ = sp_model
    ours, theirs = lms
    source = stdlib_texts(3)[2]
    short, exact, long_ = (prefix_with_tokens(tok, source, n) for n in (20, 3 * C, 3 * C + 11))
    got = rolling(ours, [short, exact, long_])
    # lm-eval's own hf model on the export: the same numbers
    np.testing.assert_allclose(got, rolling(theirs, [short, exact, long_]), rtol=1e-5)
    for text, lp in zip([short, exact, long_], got):
        stream = np.array([tok.eos_id] + tok.encode(text))       # scored after one EOS
        nll, n = score_stream(model, stream, C, C)                # cratelm eval's windows, stride C
        assert n == len(stream) - 1
        if text is long_:
            # the documented difference: lm-eval right-aligns the last window (C inputs ending
            # at the last token) where cratelm eval starts it at the next multiple of C
            k, r = divmod(len(stream) - 1, C)
            head, _ = score_stream(model, stream[:k * C + 1], C, C)
            x = torch.as_tensor(stream[len(stream) - 1 - C:-1])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0].double(), -1)
            tail = -logp[-r:].gather(1, torch.as_tensor(stream[-r:])[:, None]).sum().item()
            assert -lp == pytest.approx(head + tail, rel=1e-6)
            assert abs(-lp - nll) > 1e-4                           # and the difference is real
        else:
            assert -lp == pytest.approx(nll, rel=1e-6)


def test_generate_until_matches_cratelm_and_hf(sp_model, lms):
    from lm_eval.api.instance import Instance

    tok, model, _, _ = sp_model
    ours, theirs = lms
    contexts = ["import os\nimport sys\n\n\ndef main(", "class A:\n    def __init__(self", "x = 1"]
    kw = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    reqs = [Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(contexts)]
    got = ours.generate_until(reqs, disable_tqdm=True)
    for c, text in zip(contexts, got):
        ids = torch.tensor([tok.encode(c)])
        want = tok.decode(model.generate(ids, 12, temperature=0)[0, ids.shape[1]:].tolist()).split("\n\n")[0]
        assert text == want
    assert got == theirs.generate_until(reqs, disable_tqdm=True)   # left-padded batch through the export


MC = [{"question": f"def f{i}(x):\n    return", "choices": [" x", " None", " 1", " self.x"], "label": i % 4}
      for i in range(8)] + [{"question": "import", "choices": [" os", " sys", " re"], "label": i % 3} for i in range(4)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local lm-eval tasks: tiny_mc (multiple choice) and tiny_rolling (wikitext-style)."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t[:300]}) + "\n" for t in stdlib_texts(4)))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "tiny_rolling.yaml").write_text(f"""task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return d


def test_multiple_choice_accuracy_same_through_hf_and_cratelm(sp_model, lms, task_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, _, cratelm_dir, _ = sp_model
    ours, theirs = lms
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)   # (indexing lm-eval's own: ~20 s)
    runs = [lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, bootstrap_iters=0,
                                    log_samples=True) for lm in (ours, theirs)]
    a, b = (r["results"]["tiny_mc"] for r in runs)
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    resps = [[[float(x[0]) for x in s["filtered_resps"]] for s in r["samples"]["tiny_mc"]] for r in runs]
    assert len(resps[0]) == len(MC)
    np.testing.assert_allclose(np.concatenate(resps[0]), np.concatenate(resps[1]), rtol=1e-5)
    # `cratelm eval --tasks` hands the same over to lm-eval (and the rolling task too)
    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(cratelm_dir), "--tasks", "tiny_mc,tiny_rolling",
                 "--include-path", str(task_dir), "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["tiny_mc"]["acc,none"] == a["acc,none"]
    assert results["tiny_rolling"]["bits_per_byte,none"] > 0
