from pathlib import Path

import pytest

from cratelm.config import ConfigError, ModelConfig, TrainConfig, batch_plan, load_config

ROOT = Path(__file__).resolve().parents[2]
# job configs (configs/compare/ holds `cratelm compare` presets, checked in tests/workbench)
YAMLS = sorted((ROOT / "configs" / "model").glob("*.yaml")) + sorted((ROOT / "configs" / "train").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in YAMLS}
    for size in ("base", "medium", "large", "xl"):
        assert f"crate-gpt2-{size}" in names and f"gpt2-{size}" in names
    assert "tiny" in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    cfg = load_config([str(path)])
    assert cfg.model.d_model % cfg.model.n_head == 0


@pytest.mark.parametrize("override, field", [
    ("model.n_head=5", "model.n_head=5"),
    ("model.arch=crate-xl", "model.arch='crate-xl'"),
    ("model.eta=-0.1", "model.eta=-0.1"),
    ("model.n_layer=0", "model.n_layer=0"),
    ("train.precision=fp8", "train.precision='fp8'"),
    ("model.n_layr=3", "model.n_layr"),
    ("model.n_layer=two", "model.n_layer='two'"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(".", r"\.")):
        load_config([str(ROOT / "configs/model/tiny.yaml")], [override])


def test_precedence_cli_over_later_file_over_earlier(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: {n_layer: 3, d_model: 32, n_head: 4}\ntrain: {micro_batch: 2}\n")
    b.write_text("model: {n_layer: 5}\n")
    cfg = load_config([str(a), str(b)], ["model.n_head=8"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.train.micro_batch) == (5, 32, 8, 2)


def test_unknown_key_names_its_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {widht: 3}\n")
    with pytest.raises(ConfigError, match=r"model\.widht \(from .*bad\.yaml\)"):
        load_config([str(bad)])
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        bad.write_text("modle: {}\n")
        load_config([str(bad)])


def test_arch_defaults_and_vocab_padding():
    assert ModelConfig().padded_vocab == 50304
    lm = ModelConfig(arch="crate-lm")
    assert (lm.overcomplete, lm.ista_steps) == (4, 2)
    with pytest.raises(ConfigError, match="crate-gpt is one ISTA step"):
        ModelConfig(arch="crate-gpt", ista_steps=2)
    with pytest.raises(ConfigError, match="gpt2 needs sdpa"):
        ModelConfig(arch="gpt2", attn_backend="triton")


def test_pipeline_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="zero_stage=3 cannot be combined with train.pipeline_stages=2"):
        TrainConfig(zero_stage=3, pipeline_stages=2)


def test_batch_plan_arithmetic():
    t = TrainConfig(micro_batch=4, global_batch=32)
    plan = batch_plan(t, world_size=4)
    assert (plan.micro_batch, plan.grad_accum, plan.dp_size, plan.global_batch) == (4, 2, 4, 32)
    with pytest.raises(ConfigError, match=r"global_batch=30 is not divisible by train.micro_batch=4 x data-parallel size 2"):
        batch_plan(TrainConfig(micro_batch=4, global_batch=30), world_size=2)
    with pytest.raises(ConfigError, match="grad_accum=3 conflicts"):
        batch_plan(TrainConfig(micro_batch=4, global_batch=32, grad_accum=3), world_size=4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by train.pipeline_stages=2"):
        batch_plan(TrainConfig(pipeline_stages=2), world_size=3)
