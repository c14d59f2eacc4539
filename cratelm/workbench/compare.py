"""``cratelm compare``: CRATE variants and GPT-2 under one data, tokenizer, recipe and token budget.

    cratelm compare --preset cpu --out compare/          # make compare: 4 archs, ~1-3M params, CPU
    cratelm compare --preset paper --out runs/paper --data data/owt       # base sizes, for GPUs
    cratelm compare --preset cpu --out compare/ --only   # table and plots from the finished runs

A preset (configs/compare/*.yaml) names the corpus, the common recipe (config files and
overrides: optimiser, schedule, batch, steps) and, per run, MODEL settings only, so every
run sees the same data in the same order for the same number of tokens (checked). Runs
train one after another in this process, each an ordinary cratelm run directory
OUT/runs/NAME resumed with ``--resume auto`` semantics: rerunning compare skips finished
runs and continues an interrupted one. (For several GPUs per run, train the run
directories with ``torchrun ... cratelm train`` yourself and then call ``compare --only``.)

Outputs (each written whole, then renamed): OUT/compare.md and OUT/compare.json, the table
of params, non-embedding params, FLOPs/token, tokens seen, final validation loss,
perplexity and bits per byte (by cratelm.evaluate on the whole validation shard: the
numbers ``cratelm eval`` prints), tokens/s and time; OUT/loss_vs_tokens.png,
OUT/loss_vs_flops.png (the runs' validation records in metrics.jsonl) and OUT/whitebox.png
(per-layer compression and ISTA sparsity at the last diagnostics record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cratelm.config import ConfigError, JobConfig, batch_plan, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {p.stem: p for p in sorted((ROOT / "configs" / "compare").glob("*.yaml"))}


@dataclass
class Plan:
    """A resolved comparison: the output directory, the corpus and one JobConfig per run."""

    out: Path
    data: Path
    runs: dict[str, JobConfig] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"compare preset {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise ConfigError(f"compare preset {path}: needs a 'runs' mapping of run name -> model settings")
    return data


def _path(p: str, base: Path) -> str:
    """A config path of a preset: absolute, relative to the repository, or to the preset file."""
    for cand in (Path(p), ROOT / p, base / p):
        if cand.is_file():
            return str(cand)
    raise ConfigError(f"config file {p} does not exist (looked in {ROOT} and {base})")


def _run_settings(name: str, entries: list[str], base: Path) -> tuple[list[str], list[str]]:
    """(files, overrides) of one run; only model settings may differ between runs."""
    if not isinstance(entries, list):
        raise ConfigError(f"compare run {name!r}: expected a list of model.KEY=VALUE and model YAML files")
    files, overrides = [], []
    for e in map(str, entries):
        if "=" in e:
            if not e.startswith("model."):
                raise ConfigError(f"compare run {name!r}: {e!r} is not a model setting; the recipe (data, "
                                  "optim, train) is common to all runs: put it in the preset's overrides")
            overrides.append(e)
        else:
            path = _path(e, base)
            sections = set(yaml.safe_load(Path(path).read_text()) or {})
            if sections - {"model"}:
                raise ConfigError(f"compare run {name!r}: {path} sets {sorted(sections - {'model'})}; a run's "
                                  "files may set the model only")
            files.append(path)
    return files, overrides


def plan(preset: str, out: str | os.PathLike, data: str | None = None, overrides: list[str] = (),
         only_runs: list[str] | None = None, prepare: bool = True) -> Plan:
    """Resolve a preset (a name in configs/compare or a YAML path) into run configs.

    The corpus: ``data`` if given, else the preset's ``data`` path, else its ``corpus``
    (python-stdlib), prepared into OUT/data when ``prepare``."""
    path = PRESETS.get(preset) or Path(preset)
    if not path.is_file():
        raise ConfigError(f"compare: no preset {preset!r} (presets: {sorted(PRESETS)}, or a YAML path)")
    spec = _read_yaml(path)
    out = Path(out).resolve()
    data_dir = Path(data or spec.get("data") or out / "data")
    corpus = spec.get("corpus")
    if not (data_dir / "meta.json").is_file():
        if data or spec.get("data") or not corpus:
            raise ConfigError(f"compare: {data_dir} is not a prepared corpus (no meta.json); run "
                              "`cratelm prepare-data` first")
        if not prepare:
            raise ConfigError(f"compare: {data_dir} is not prepared; run compare without --only first")
        from cratelm.demo import prepare as prepare_corpus

        prepare_corpus(data_dir, int(corpus.get("vocab_size", 4096)), corpus.get("max_documents"),
                       corpus.get("val", 40))
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    common_files = [_path(f, path.parent) for f in spec.get("config", [])]
    common = [*map(str, spec.get("overrides", [])), *overrides]
    names = only_runs or list(spec["runs"])
    unknown = sorted(set(names) - set(spec["runs"]))
    if unknown:
        raise ConfigError(f"compare: unknown run(s) {unknown}; the preset has {list(spec['runs'])}")
    result = Plan(out, data_dir)
    for name in names:
        files, model = _run_settings(name, spec["runs"][name], path.parent)
        result.runs[name] = load_config(common_files + files, [
            *common, *model, f"model.vocab_size={vocab}", f"data.train=[{data_dir}]", f"data.val={data_dir}",
            f"train.run_dir={out / 'runs' / name}"])
    budget = {name: token_budget(cfg) for name, cfg in result.runs.items()}
    if len(set(budget.values())) > 1:
        raise ConfigError(f"compare: the runs must train on the same number of tokens; got {budget} "
                          "(max_steps x global batch x context)")
    return result


def token_budget(cfg: JobConfig) -> int:
    """Tokens one run trains on in this process (one rank): max_steps x global batch x context."""
    return cfg.train.max_steps * batch_plan(cfg.train, 1).global_batch * cfg.model.context


def finished(cfg: JobConfig) -> bool:
    """Has this run directory a complete checkpoint at train.max_steps?"""
    from cratelm.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(Path(cfg.train.run_dir) / ckpt.CKPT_DIR)
    return latest is not None and int(ckpt.read_meta(latest)["step"]) >= cfg.train.max_steps


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)


def train_runs(p: Plan) -> dict[str, str]:
    """Train every unfinished run (resuming it); returns name -> "trained" / "skipped"."""
    from cratelm.dist import close_process_group
    from cratelm.train import train

    done: dict[str, str] = {}
    walls_path = p.out / "wall_times.json"
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                  "MASTER_ADDR", "MASTER_PORT")}
    try:
        for name, cfg in p.runs.items():
            if finished(cfg):
                print(f"cratelm compare: {name}: finished already ({cfg.train.run_dir}); skipped", flush=True)
                done[name] = "skipped"
                continue
            print(f"\n=== cratelm compare: training {name} -> {cfg.train.run_dir}", flush=True)
            t0 = time.perf_counter()
            trainer = train(cfg, resume="auto")
            walls = json.loads(walls_path.read_text()) if walls_path.is_file() else {}
            walls[name] = walls.get(name, 0.0) + time.perf_counter() - t0     # summed over resumes
            _write_atomic(walls_path, json.dumps(walls, indent=2) + "\n")
            if trainer.exit_code != 0:
                raise RuntimeError(f"compare: run {name} stopped with exit code {trainer.exit_code} (see "
                                   f"{cfg.train.run_dir}/status.json); rerun compare to resume it")
            done[name] = "trained"
    finally:
        close_process_group()
        for k, v in env_before.items():     # leave the environment as we found it
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue                      # a torn last line (a killed run)
    return out


def curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation loss against tokens seen, the training time, and the last diagnostics, from metrics.jsonl."""
    logs = [r for r in records if "train/tokens" in r]
    per_step = logs[-1]["train/tokens"] / logs[-1]["step"] if logs else 0.0
    train_s, prev = 0.0, 0
    for r in logs:                        # each log record covers the steps since the previous one
        if "perf/step_ms" in r:
            train_s += r["perf/step_ms"] / 1e3 * (r["step"] - prev)
        prev = r["step"]
    val = [(r["step"] * per_step, r["val/loss"]) for r in records if "val/loss" in r]
    diags = [r for r in records if any(k.startswith("diag/") for k in r)]
    layers: dict[str, list[float]] = {"compression": [], "sparsity": []}
    if diags:
        last = diags[-1]
        n = len({k.split("/")[1] for k in last if k.startswith("diag/layer_")})
        for key in layers:
            layers[key] = [last[f"diag/layer_{i:02d}/{key}"] for i in range(n)]
    return {"tokens": int(logs[-1]["train/tokens"]) if logs else 0, "train_s": train_s, "val": val,
            "diag_step": diags[-1]["step"] if diags else None, **layers}


def evaluate_run(cfg: JobConfig, cache: Path) -> dict[str, Any]:
    """``cratelm eval --checkpoint RUN_DIR --data VAL`` of a finished run (cached per checkpoint)."""
    from dataclasses import asdict

    import torch

    from cratelm.checkpoints import load_model
    from cratelm.evaluate import evaluate
    from cratelm.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(Path(cfg.train.run_dir) / ckpt.CKPT_DIR)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint") == str(latest):
            return cached
    val = Path(cfg.data.val)
    val = val / "val.bin" if val.is_dir() else val
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_model(cfg.train.run_dir, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32        # cratelm eval's defaults
    result = asdict(evaluate(model, [str(val)], meta, device=device, dtype=dtype, progress=False)[0])
    out = {"checkpoint": str(latest), "device": device, **result}
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache, json.dumps(out, indent=2) + "\n")
    return out


def table(p: Plan) -> list[dict[str, Any]]:
    """One row per finished run (unfinished runs are listed with their status)."""
    from cratelm.model.accounting import count_params, flops_per_token

    walls_path = p.out / "wall_times.json"
    walls = json.loads(walls_path.read_text()) if walls_path.is_file() else {}
    rows = []
    for name, cfg in p.runs.items():
        row: dict[str, Any] = {"run": name, "arch": cfg.model.arch, "run_dir": cfg.train.run_dir,
                               **count_params(cfg.model), "flops_per_token": flops_per_token(cfg.model)}
        if not finished(cfg):
            rows.append({**row, "status": "unfinished"})
            continue
        c = curves(read_metrics(cfg.train.run_dir))
        ev = evaluate_run(cfg, p.out / "eval" / f"{name}.json")
        rows.append({**row, "status": "finished", "tokens": c["tokens"], "val_loss": ev["loss"],
                     "perplexity": ev["perplexity"], "bits_per_byte": ev["bits_per_byte"],
                     "val_tokens": ev["tokens"], "tokens_per_s": c["tokens"] / c["train_s"] if c["train_s"] else None,
                     "train_s": c["train_s"], "wall_s": walls.get(name),
                     "curve": {"tokens": [t for t, _ in c["val"]], "val_loss": [v for _, v in c["val"]]},
                     "diag_step": c["diag_step"], "compression": c["compression"], "sparsity": c["sparsity"]})
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| run | arch | params | non-emb. params | FLOPs/token | tokens seen | val loss (nats/token) | "
            "perplexity | bits/byte | tokens/s | train time (s) | wall time (s) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r["status"] != "finished":
            lines.append(f"| {r['run']} | {r['arch']} | {r['params']:,} | {r['non_embedding_params']:,} | "
                         f"{r['flops_per_token']:,} | {r['status']} |" + " - |" * 7)
            continue
        lines.append(f"| {r['run']} | {r['arch']} | {r['params']:,} | {r['non_embedding_params']:,} | "
                     f"{r['flops_per_token']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | "
                     f"{_fmt(r['bits_per_byte'], '.4f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{r['train_s']:.1f} | {_fmt(r['wall_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def compare(preset: str, out: str | os.PathLike, only: bool = False, data: str | None = None,
            overrides: list[str] = (), runs: list[str] | None = None) -> list[dict[str, Any]]:
    """Train (unless ``only``) and write the table and plots; returns the table rows."""
    from cratelm.workbench.plots import plot_all

    p = plan(preset, out, data, overrides, runs, prepare=not only)
    p.out.mkdir(parents=True, exist_ok=True)
    if not only:
        train_runs(p)
    rows = table(p)
    if not any(r["status"] == "finished" for r in rows):
        raise ConfigError(f"compare: no finished run under {p.out / 'runs'}; run compare without --only")
    plot_all(rows, p.out)
    _write_atomic(p.out / "compare.md", markdown(rows))
    _write_atomic(p.out / "compare.json", json.dumps({"data": str(p.data), "runs": rows}, indent=2) + "\n")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help=f"one of {sorted(PRESETS)} or a preset YAML file")
    p.add_argument("--out", default="compare", help="output directory (runs/, table, plots)")
    p.add_argument("--only", action="store_true", help="no training: the table and plots from finished runs")
    p.add_argument("--data", default=None, help="a prepared corpus directory (overrides the preset's)")
    p.add_argument("--runs", default=None, help="comma-separated subset of the preset's runs")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the common recipe")


def run(args: argparse.Namespace) -> int:
    try:
        rows = compare(args.preset, args.out, args.only, args.data, args.overrides,
                       args.runs.split(",") if args.runs else None)
    except RuntimeError as e:
        print(f"cratelm compare: {e}", file=sys.stderr)
        return 1
    print("\n" + markdown(rows), end="")
    print(f"cratelm compare: wrote {Path(args.out) / 'compare.md'}, compare.json and the plots")
    return 0
