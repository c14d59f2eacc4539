"""``train.init_from``: a fresh run starts from a Hugging Face export of a trained model, with
the source's exact weights (its first logged loss is the source's loss on that batch) on one
process, on a 2-stage pipeline and under ZeRO-3; a resumed run ignores it; a source of another
architecture or tokenizer is refused before any process group (exit 2).

The corpus is conftest's rule corpus with a real 64-word ``tokenizer.json`` (so the HF export
carries a tokenizer whose sha256 the shards record); the source is trained in this process with
plain torch (40 AdamW steps, under a second) and exported with `cratelm.hf.export.save_hf`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from .conftest import VOCAB, job_config, losses, run_cmd, torchrun, write_corpus, write_yaml, REPO

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cratelm.config import ConfigError, config_from_dict  # noqa: E402
from cratelm.data.dataset import BatchSampler  # noqa: E402
from cratelm.data.loading import open_data  # noqa: E402
from cratelm.model.crate import CrateLM  # noqa: E402
from cratelm.train import init_from  # noqa: E402

DRIVER = str(REPO / "tests" / "train" / "dist_driver.py")
REL = 1e-5


def write_word_tokenizer(path: Path) -> Path:
    """A tokenizers WordLevel tokenizer.json: ids 0..63 are "<unk>", "</s>" (EOS), "w2" .. "w63"."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    tk.add_special_tokens(["</s>"])
    tk.save(str(path))
    return path


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory) -> Path:
    from cratelm.data.indexed import write_json_atomic
    from cratelm.utils import file_sha256

    out = write_corpus(tmp_path_factory.mktemp("word-corpus"))
    tok = write_word_tokenizer(out / "tokenizer.json")
    (out / "tokenizer.model").unlink()
    meta = json.loads((out / "meta.json").read_text())
    write_json_atomic(out / "meta.json", {**meta, "tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(tok)})
    return out


def first_batch_loss(model: torch.nn.Module, cfg) -> float:
    """The loss a 1-process run logs at step 1: the mean over the first global batch's micro-batches."""
    data = open_data(cfg)
    t = cfg.train
    accum = t.global_batch // t.micro_batch
    sampler = BatchSampler(data.train, t.micro_batch, accum, 0, 1, seed=cfg.data.seed)
    with torch.no_grad():
        return sum(float(model(*sampler.next_micro_batch())) for _ in range(accum)) / accum


@pytest.fixture(scope="module")
def source(word_corpus, tmp_path_factory) -> dict:
    """A crate-gpt model trained 40 steps on the corpus, exported to transformers (+ tokenizer.json)."""
    from cratelm.checkpoints import load_model
    from cratelm.hf.export import save_hf

    tmp = tmp_path_factory.mktemp("init-from")
    cfg = config_from_dict(job_config(word_corpus, tmp / "unused"))
    torch.manual_seed(0)
    model = CrateLM(cfg.model, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = BatchSampler(open_data(cfg).train, 8, 1, 0, 1, seed=99)
    for _ in range(40):
        loss = model(*sampler.next_micro_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf = save_hf(model.eval(), tmp / "hf", tokenizer=str(word_corpus / "tokenizer.json"))
    imported, meta = load_model(hf)        # what train.init_from loads (cratelm eval loads the same)
    fresh = CrateLM(cfg.model, seed=cfg.train.seed).eval()      # a fresh run's initial weights
    return {"hf": hf, "tmp": tmp, "model": imported, "meta": meta, "loss": first_batch_loss(imported, cfg),
            "fresh_loss": first_batch_loss(fresh, cfg)}


@pytest.fixture(scope="module")
def single(word_corpus, source) -> Path:
    """`cratelm train train.init_from=HF_DIR`: one plain process, 4 steps."""
    run_dir = source["tmp"] / "single"
    cfg = write_yaml(source["tmp"] / "single.yaml", job_config(word_corpus, run_dir, train={"max_steps": 4}))
    run_cmd([sys.executable, "-m", "cratelm", "train", "--config", str(cfg), f"train.init_from={source['hf']}"],
            timeout=200)
    return run_dir


def test_fresh_run_starts_from_the_exported_weights_and_keeps_learning(single, source):
    got = losses(single)
    assert source["loss"] < source["fresh_loss"] - 1.0, source     # the source did learn
    assert abs(got[1] - source["loss"]) <= REL * source["loss"], (got[1], source["loss"])
    assert max(got.values()) < source["fresh_loss"] - 1.0, (got, source["fresh_loss"])
    assert json.loads((single / "status.json").read_text())["status"] == "finished"


def test_the_run_records_its_source(single, source):
    record = json.loads((single / "init_from.json").read_text())
    assert record["init_from"] == str(Path(source["hf"]).resolve())
    assert record["weights_sha256"] == init_from.weights_sha256(source["model"].state_dict())
    assert record["tokenizer_sha256"] == source["meta"]["tokenizer_sha256"] is not None
    assert f"init_from: {source['hf']}" in (single / "config.yaml").read_text()


@pytest.mark.distributed
def test_pipeline_and_zero3_start_from_the_same_weights(word_corpus, source, single):
    """2 ranks: a 2-stage pipeline (each stage its layers, both ends the tied embedding) and ZeRO-3
    (parameters partitioned after the load) log the 1-process run's first loss."""
    tmp = source["tmp"]
    common = {"micro_batch": 2, "global_batch": 4, "max_steps": 1, "init_from": str(source["hf"])}
    runs = {"z3": tmp / "z3", "pipe": tmp / "pipe"}     # (a ZeRO engine after a pipeline one in a process fails)
    jobs = [{"config": job_config(word_corpus, runs["z3"], train={**common, "zero_stage": 3})},
            {"config": job_config(word_corpus, runs["pipe"], train={**common, "pipeline_stages": 2})}]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    run_cmd(torchrun(2, DRIVER, str(tmp / "jobs.json")), timeout=300)
    want = losses(single)[1]
    for name, run_dir in runs.items():
        got = losses(run_dir)[1]
        assert abs(got - want) <= REL * want, (name, got, want)


def test_a_resumed_run_ignores_init_from_and_says_so_once(word_corpus, source, tmp_path, capsys):
    cfg = config_from_dict(job_config(word_corpus, tmp_path / "run", train={"init_from": str(source["hf"])}))
    out = init_from.resolve(cfg, open_data(cfg), tmp_path / "some-checkpoint")
    assert out.train.init_from is None and cfg.train.init_from == str(source["hf"])
    printed = capsys.readouterr().out
    assert printed.count("train.init_from") == 1 and "is ignored" in printed
    assert not (tmp_path / "run" / "init_from.json").exists()


def test_fields_that_change_no_weight_may_differ(word_corpus, source, tmp_path):
    cfg = config_from_dict(job_config(word_corpus, tmp_path / "run", model={"dropout": 0.1, "attn_backend": "reference",
                                                                            "loss_impl": "plain", "init_std": 0.05},
                                      train={"init_from": str(source["hf"])}))
    assert init_from.resolve(cfg, open_data(cfg), None) is cfg
    module = CrateLM(cfg.model, seed=0)
    init_from.load_into(module, cfg)
    for k, v in source["model"].state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k


def _train_main(monkeypatch, capsys, tmp_path, cfg: dict) -> tuple[int, str]:
    from cratelm.train import trainer

    monkeypatch.setattr(trainer, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError("started")))
    rc = trainer.main(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))])
    return rc, capsys.readouterr().err


def test_another_architecture_is_refused_naming_the_field(word_corpus, source, tmp_path, monkeypatch, capsys):
    cfg = job_config(word_corpus, tmp_path / "run", model={"n_head": 2}, train={"init_from": str(source["hf"])})
    rc, err = _train_main(monkeypatch, capsys, tmp_path, cfg)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert f"train.init_from={source['hf']} holds a different model: model.n_head: source 4, config 2" in lines[0]
    run = tmp_path / "run"                 # the writability check may create it; nothing is written in it
    assert not run.exists() or not any(run.iterdir())


def test_another_tokenizer_is_refused_naming_both_sha256(word_corpus, source, tmp_path, monkeypatch, capsys):
    from cratelm.checkpoints import save_model
    from cratelm.utils import file_sha256

    (tmp_path / "other").mkdir()
    other = write_word_tokenizer(tmp_path / "other" / "tokenizer.json")
    other.write_text(other.read_text().replace('"w2"', '"x2"'))
    src = save_model(source["model"], source["model"].cfg, tmp_path / "exported", tokenizer=str(other))
    cfg = job_config(word_corpus, tmp_path / "run", train={"init_from": str(src)})
    rc, err = _train_main(monkeypatch, capsys, tmp_path, cfg)
    want, have = file_sha256(other), file_sha256(word_corpus / "tokenizer.json")
    assert rc == 2 and want != have and len(err.strip().splitlines()) == 1, err
    assert f"tokenizer of sha256 {want}, but {word_corpus / 'meta.json'} was tokenized with a tokenizer of " \
           f"sha256 {have}" in err
    with pytest.raises(ConfigError, match="no such model"):
        init_from.resolve(config_from_dict({**cfg, "train": {**cfg["train"], "init_from": str(tmp_path / "none")}}),
                          open_data(config_from_dict(cfg)), None)
