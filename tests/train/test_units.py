"""Single-process tests of the training pieces: schedule, DeepSpeed config, config-time errors
(before any process group), parameter groups, the skippable optimizer, checkpoint
bookkeeping, metrics, the pipeline name mapping, and the shipped YAML files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cratelm.config import ConfigError, config_from_dict, load_config
from cratelm.train import checkpoint as ckpt
from cratelm.train.ds_config import check_job, ds_config
from cratelm.train.optimizer import make_optimizer, param_groups
from cratelm.train.schedule import lr_at
from .conftest import REPO, base_env, job_config, write_yaml

CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def cfg_of(corpus, tmp_path, **sections):
    return config_from_dict(job_config(corpus, tmp_path / "run", **sections))


# ----------------------------------------------------------------------------- schedule

def test_warmup_then_cosine_to_min_lr():
    o = load_config(overrides=["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4",
                               "optim.decay_steps=14"]).optim
    assert [lr_at(s, o, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, o, 100) == pytest.approx(0.55)              # half way: (1 + 0.1) / 2
    assert lr_at(14, o, 100) == pytest.approx(0.1) and lr_at(99, o, 100) == pytest.approx(0.1)
    assert all(lr_at(s, o, 100) >= lr_at(s + 1, o, 100) for s in range(3, 20))
    o2 = load_config(overrides=["optim.warmup_steps=0", "optim.min_lr=0"]).optim   # decay_steps = max_steps
    assert lr_at(0, o2, 10) == pytest.approx(o2.lr) and lr_at(10, o2, 10) == 0.0


# ----------------------------------------------------------------------------- DeepSpeed config

def test_generated_deepspeed_config(corpus, tmp_path):
    cfg = cfg_of(corpus, tmp_path, train={"zero_stage": 2, "precision": "bf16", "micro_batch": 2,
                                          "global_batch": 16, "offload_optimizer": True,
                                          "activation_checkpointing": True})
    plan = check_job(cfg, world_size=4, dev_type="cpu")
    assert (plan.micro_batch, plan.grad_accum, plan.dp_size, plan.global_batch) == (2, 2, 4, 16)
    ds = ds_config(cfg, plan, "cpu")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_force_ds_cpu_optimizer"] is False and "activation_checkpointing" in ds
    fp16 = ds_config(cfg_of(corpus, tmp_path, train={"precision": "fp16"}), plan, "cuda")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0          # dynamic loss scaling


def test_user_deepspeed_json_overrides_and_conflicts(corpus, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 5}))
    cfg = cfg_of(corpus, tmp_path, train={"zero_stage": 1, "deepspeed_config": str(user)})
    plan = check_job(cfg, 2, "cpu")
    ds = ds_config(cfg, plan, "cpu")
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123} and ds["steps_per_print"] == 5
    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"train_batch_size=64 .* train_batch_size=4 \(global batch 4 = "
                                          r"micro_batch 2 x grad_accum 1 x data-parallel size 2\)"):
        ds_config(cfg, plan, "cpu")
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        ds_config(cfg, plan, "cpu")
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match=r"offload_optimizer.device='cpu' but train.offload_optimizer=false"):
        ds_config(cfg, plan, "cpu")
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    pcfg = cfg_of(corpus, tmp_path, train={"pipeline_stages": 2, "deepspeed_config": str(user)})
    with pytest.raises(ConfigError, match="stage=3, which cannot be combined with train.pipeline_stages=2"):
        ds_config(pcfg, check_job(pcfg, 2, "cpu"), "cpu")


@pytest.mark.parametrize("train,world,message", [
    ({"pipeline_stages": 2, "zero_stage": 3}, 2,
     r"train.zero_stage=3 cannot be combined with train.pipeline_stages=2"),
    ({"pipeline_stages": 2, "zero_stage": 2}, 2,
     r"train.zero_stage=2 cannot be combined with train.pipeline_stages=2"),
    ({"pipeline_stages": 2, "pipeline_partition": "uniform"}, 2,
     r"model.n_layer=3 is not divisible by train.pipeline_stages=2 \(3 = 1 x 2 \+ 1\)"),
    ({"micro_batch": 2, "global_batch": 6}, 2,
     r"train.global_batch=6 is not divisible by train.micro_batch=2 x data-parallel size 2 \(= 4"),
    ({"pipeline_stages": 2, "global_batch": 4}, 3, r"world size 3 is not divisible by train.pipeline_stages=2"),
    ({"global_batch": 8, "grad_accum": 3}, 2,
     r"train.grad_accum=3 conflicts with train.global_batch=8 = micro_batch 2 x grad_accum 2 x data-parallel size 2"),
    ({"precision": "fp16"}, 1, r"fp16 is not supported on CPU"),
    ({"pipeline_stages": 2, "pipeline_partition": "type:[bad"}, 2, r"bad regular expression"),
    ({"pipeline_stages": 2, "precision": "bf16", "zero_stage": 0}, 2,
     r"bf16 with train.pipeline_stages=2 needs ZeRO stage 1"),
])
def test_config_errors_fail_before_any_process_group(corpus, tmp_path, monkeypatch, capsys, train, world, message):
    """`cratelm train` exits 2 with the numbers, and never starts a process group."""
    import deepspeed
    import torch.distributed as dist

    from cratelm.train import trainer

    def forbidden(*a, **k):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setattr(deepspeed, "init_distributed", forbidden)
    monkeypatch.setattr(trainer, "init_distributed", forbidden)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    cfg = job_config(corpus, tmp_path / "run", model={"n_layer": 3}, train=train)
    rc = trainer.main(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))])
    err = capsys.readouterr().err
    assert rc == trainer.EXIT_CONFIG and "config error" in err
    assert __import__("re").search(message, err), err


def test_fresh_start_into_a_run_with_checkpoints_is_refused(corpus, tmp_path, monkeypatch, capsys):
    from cratelm.train import trainer

    done = tmp_path / "run" / "checkpoints" / "step_00000002"
    done.mkdir(parents=True)
    (done / "cratelm.json").write_text(json.dumps({"complete": True, "step": 2}))
    monkeypatch.setattr(trainer, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError))
    cfg = write_yaml(tmp_path / "c.yaml", job_config(corpus, tmp_path / "run"))
    assert trainer.main(["--config", str(cfg)]) == 2
    assert "already holds checkpoints (step_00000002); pass --resume auto" in capsys.readouterr().err
    assert trainer.main(["--config", str(cfg), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no complete cratelm checkpoint" in capsys.readouterr().err


def test_cli_config_error_is_quick_and_has_exit_code_2(corpus, tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", job_config(corpus, tmp_path / "run", train={"global_batch": 3}))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "cratelm", "train", "--config", str(cfg), "model.n_layer=2"],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.global_batch=3 is not divisible by train.micro_batch=2 x data-parallel size 1" in proc.stderr
    assert "Initializing TorchBackend" not in proc.stderr + proc.stdout
    assert time.time() - t0 < 60


def test_missing_data_is_a_config_error(tmp_path):
    from cratelm.data.loading import open_data

    cfg = config_from_dict({"data": {"train": [str(tmp_path / "nothing")]}, "model": {"vocab_size": 64}})
    with pytest.raises(ConfigError, match="nothing"):
        open_data(cfg)


def test_data_vocabulary_must_fit_the_model(corpus, tmp_path):
    from cratelm.data.loading import open_data

    with pytest.raises(ConfigError, match="vocab_size=64 but model.vocab_size=32"):
        open_data(cfg_of(corpus, tmp_path, model={"vocab_size": 32}))


# ----------------------------------------------------------------------------- optimizer

def test_weight_decay_on_2d_parameters_only():
    from cratelm.model.crate import CrateLM

    cfg = load_config(overrides=["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.vocab_size=64",
                                 "model.arch=crate-lm"])
    model = CrateLM(cfg.model, seed=0)
    groups = param_groups(model.named_parameters(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    ids = {id(p) for p in decay["params"]}
    assert id(model.embed.wte.weight) in ids and id(model.ln_f.weight) not in ids


def test_skipped_step_changes_nothing():
    cfg = load_config()
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt = make_optimizer([{"params": [w], "weight_decay": 0.1}], cfg, "cpu")
    w.grad = torch.full_like(w, float("nan"))
    opt.skip_next = True
    opt.step()
    assert opt.skipped and torch.equal(w, torch.ones(3, 3)) and not opt.state
    opt.skip_next, opt.check_grads = False, True           # the gradient check finds the NaN itself
    opt.skipped = False
    opt.step()
    assert opt.skipped and torch.equal(w, torch.ones(3, 3))
    w.grad = torch.ones_like(w)
    opt.step()
    assert not torch.equal(w, torch.ones(3, 3))


# ----------------------------------------------------------------------------- checkpoints

def _fake(root: Path, step: int, complete: bool) -> Path:
    d = root / ckpt.tag_of(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.MARKER).write_text(json.dumps({"complete": True, "step": step}))
    return d


def test_latest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) is None
    a, b, c = _fake(root, 10, True), _fake(root, 20, True), _fake(root, 30, False)
    assert ckpt.latest_checkpoint(root) == b                   # no `latest` file: newest complete
    (root / "latest").write_text("step_00000010")
    assert ckpt.latest_checkpoint(root) == a                   # `latest` wins when complete
    (root / "latest").write_text("step_00000030")
    assert ckpt.latest_checkpoint(root) == b                   # ... but never an incomplete one
    assert ckpt.resolve(tmp_path) == b and ckpt.resolve(root) == b and ckpt.resolve(a) == a
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        ckpt.resolve(c)
    d = _fake(root, 40, True)
    gone = ckpt.prune(root, keep_last=1, current=d)
    assert sorted(gone) == [a, b, c] and d.exists()           # older complete ones, and the interrupted write


def test_prune_never_deletes_newer_or_unreadable_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    old = [_fake(root, s, True) for s in (1000, 1500, 2000)]
    (old[0] / ckpt.MARKER).write_text('{"complete": tr')           # damaged marker: kept, never "incomplete"
    assert ckpt.marker_state(old[0]) == "unreadable" and ckpt.latest_checkpoint(root) == old[2]
    now = _fake(root, 1100, True)                                 # a rewound run has just written step 1100
    assert ckpt.prune(root, keep_last=1, current=now) == []
    assert all(p.exists() for p in old)
    later = _fake(root, 2500, True)
    assert ckpt.prune(root, keep_last=2, current=later) == [now, old[1]]
    assert old[0].exists() and old[2].exists()


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "r.pt")
    expect = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]


# ----------------------------------------------------------------------------- metrics

def test_metrics_logger_drops_records_after_the_resume_step(tmp_path):
    from cratelm.train.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, True)
    for s in range(1, 6):
        m.log(s, {"train/loss": float(s), "train/nan": math.nan})
    m.close()
    m = MetricsLogger(tmp_path, True, start_step=3)
    m.log(4, {"train/loss": 40.0})
    m.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert recs[0]["train/nan"] == "nan"
    # a kill mid-write leaves a torn last line: resume drops it instead of failing
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    MetricsLogger(tmp_path, True, start_step=4).close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]


def test_mpirun_ranks_are_read_from_openmpi_variables(monkeypatch):
    from cratelm.train.engine import dist_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.setenv(k, "")        # recorded, so what dist_env writes is undone afterwards
        monkeypatch.delenv(k)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="mpirun without MASTER_ADDR"):
        dist_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    env = dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.launched) == (3, 4, 1, True)


def test_throughput_mfu_and_console_line():
    from cratelm.train.metrics import PEAK_BF16_TFLOPS, console_line, peak_tflops, throughput

    out = throughput(tokens=1000, seconds=2.0, flops_per_token=6 * 10**9, n_devices=2, peak=1.5)
    assert out["perf/tokens_per_s"] == 500 and out["perf/tflops"] == pytest.approx(1.5)
    assert out["perf/mfu"] == pytest.approx(1.0)
    assert "perf/mfu" not in throughput(1000, 2.0, 10, 1, None)
    assert peak_tflops(123.0) == 123.0 and peak_tflops(None, "cpu") is None
    names = [k for k, _ in PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")
    assert names.index("L40S") < names.index("L40") < names.index("L4")
    line = console_line(7, 100, {"train/loss": 3.25, "train/lr": 6e-4, "train/grad_norm": 0.5,
                                 "perf/tokens_per_s": 41234.0, "perf/tflops": 12.3, "perf/mfu": 0.041,
                                 "mem/peak_gib": 3.2})
    assert line == ("step 7/100 | loss 3.2500 | lr 6.00e-04 | gnorm 0.500 | 41.2k tok/s | 12.30 TFLOP/s | "
                    "MFU 4.1% | mem 3.20 GiB")


# ----------------------------------------------------------------------------- pipeline names

def test_pipeline_partition_and_layer_names():
    from cratelm.model.crate import CrateLM
    from cratelm.train.pipeline import (BlockPipe, EmbedPipe, FinalNormPipe, layer_files_to_crate_state,
                                        partition_method)

    assert partition_method("uniform") == "type:BlockPipe" and partition_method("parameters") == "parameters"
    cfg = load_config(overrides=["model.arch=crate-lm", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                                 "model.vocab_size=64"]).model
    # the layers a pipeline builds, one by one, are the whole model's layers: same names, same init
    layers = {0: EmbedPipe(cfg, 5).state_dict(), 1: BlockPipe(cfg, 0, 5).state_dict(),
              2: BlockPipe(cfg, 1, 5).state_dict(), 3: FinalNormPipe(cfg).state_dict()}
    merged = layer_files_to_crate_state(layers)
    whole = CrateLM(cfg, seed=5).state_dict()
    assert merged.keys() == whole.keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="disagree"):
        layer_files_to_crate_state({0: {"a": torch.zeros(1)}, 1: {"a": torch.ones(1)}})


# ----------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_train_configs_validate(path):
    cfg = load_config([str(path)])
    for world in (1, 8):
        if world % cfg.train.pipeline_stages == 0:
            try:
                check_job(cfg, world, "cuda")
            except ConfigError as e:          # a global batch may need a particular world size
                assert "global_batch" in str(e), e


def test_paper_recipe():
    cfg = load_config([str(REPO / "configs" / "train" / "paper.yaml")])
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.min_lr, o.warmup_steps, o.beta1, o.beta2, o.weight_decay, o.grad_clip) == \
        (6e-4, 6e-5, 2000, 0.9, 0.95, 0.1, 1.0)
    assert (t.global_batch, t.max_steps, t.precision) == (384, 600000, "bf16") and cfg.model.context == 1024


# ----------------------------------------------------------------------------- validation set

def test_validation_loss_is_the_same_for_every_batch_split(corpus):
    """Same weights (float64), micro-batch x data-parallel splits -> the same val loss, equal to
    the mean over the same windows one at a time."""
    from cratelm.config import ModelConfig
    from cratelm.data import TokenWindows
    from cratelm.model.crate import CrateLM
    from cratelm.train import validation

    cfg = ModelConfig(**{**job_config(corpus, Path("unused"))["model"]})
    model = CrateLM(cfg, seed=0).double().eval()
    val = TokenWindows([str(corpus / "val.bin")], cfg.context, seed=3)
    n = 13
    ref = sum(validation.loss_sum(model, val, [i], 1, 1) for i in validation.share(val, n, 3, 0, 1)) / n
    for micro, dp in [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (3, 2), (4, 2), (2, 4)]:
        calls = validation.forward_calls(n, micro, dp)
        got = sum(validation.loss_sum(model, val, validation.share(val, n, 3, r, dp), micro, calls)
                  for r in range(dp)) / n
        assert got == pytest.approx(ref, rel=1e-12), (micro, dp)
    with pytest.raises(ConfigError, match="eval_windows=10 must be a multiple of micro_batch x data-parallel size"):
        validation.check(10, 2, 2, pipeline=True)
    validation.check(10, 2, 2, pipeline=False)


def test_bf16_zero0_goes_through_torch_autocast(corpus, tmp_path):
    for zero, stages, autocast in ((0, 1, True), (1, 1, False), (0, 2, False)):
        cfg = cfg_of(corpus, tmp_path, train={"precision": "bf16", "zero_stage": zero, "pipeline_stages": stages,
                                              "micro_batch": 1, "global_batch": 2})
        if stages > 1:
            with pytest.raises(ConfigError, match="needs ZeRO stage 1"):
                ds_config(cfg, check_job(cfg, 2, "cpu"), "cpu")
            continue
        config = ds_config(cfg, check_job(cfg, 1, "cpu"), "cpu")
        assert config["bf16"]["enabled"] is not autocast
        assert config.get("torch_autocast", {}).get("enabled", False) is autocast


def test_universal_layout_rules(tmp_path):
    from cratelm.train import universal

    two_z2 = {"world_size": 2, "pipeline_stages": 1, "zero_stage": 2}
    assert universal.describe_change(two_z2, {**two_z2, "world_size": 1, "zero_stage": 1}) == \
        "world size 2 -> 1, ZeRO stage 2 -> 1"
    assert not universal.needs_universal(two_z2, two_z2)
    assert not universal.needs_universal({**two_z2, "zero_stage": 0}, {**two_z2, "zero_stage": 0, "world_size": 4})
    assert universal.needs_universal(two_z2, {**two_z2, "world_size": 4})
    assert universal.canonical("3.blocks.2.mssa.U.weight") == "blocks.2.mssa.U.weight"
    assert universal.canonical("tied_modules.embed.embed.wte.weight") == "embed.wte.weight"
    assert universal.canonical("ln_f.weight") == "ln_f.weight"
    with pytest.raises(ValueError, match="ZeRO-0 job.*_optim_states.pt"):
        universal.check_convertible(tmp_path, {**two_z2, "zero_stage": 0}, {**two_z2, "zero_stage": 1, "world_size": 1})
    with pytest.raises(ValueError, match="only a ZeRO optimizer can load"):
        universal.check_convertible(tmp_path, two_z2, {**two_z2, "zero_stage": 0})
    for i in range(3):
        (tmp_path / f"layer_{i:02d}-model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="Megatron's layer layout"):
        universal.check_convertible(tmp_path, {**two_z2, "zero_stage": 1, "pipeline_stages": 2,
                                               "universal_checkpoint_info": True}, {**two_z2, "zero_stage": 1})
    with pytest.raises(ValueError, match="untrained copy of the tied embedding"):
        universal.check_convertible(tmp_path, {**two_z2, "zero_stage": 1, "pipeline_stages": 2},
                                    {**two_z2, "zero_stage": 1})
