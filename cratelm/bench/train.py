"""How much does the training system cost? ``cratelm train`` (DeepSpeed engine) against the
same model stepped by a plain PyTorch loop, on the same batch shapes, one process.

    python -m cratelm.bench.train --d-model 256 --n-layer 4 --context 256 --micro-batch 8 --steps 30

1. cratelm train: the trainer's own optimizer step (``Engine.train_step``: DeepSpeed
   engine forward + backward + step, the per-step all-reduce of loss / NaN / stop flags,
   batches read from memory-mapped shards), built exactly as ``cratelm train`` builds it.
2. plain: ``CrateLM`` + ``torch.optim.AdamW`` (two parameter groups, fused on CUDA),
   forward + backward + clip_grad_norm_ + step + zero_grad, on batches of the same sampler.

The two alternate step by step (one engine step, one plain step, ...), each synchronised
and timed, so that a shared or throttling machine slows both alike. Both report the median
step time after ``--warmup`` steps, tokens/s, model TFLOP/s
(cratelm.model.accounting.flops_per_token) and MFU against ``--peak-tflops``: a number,
"table" (the GPU table of cratelm.train.metrics), or "measured" (default on CPU: the rate
of a large fp32 matmul on this machine, measured first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cratelm.utils import measured_matmul_tflops, sync


def write_random_corpus(out: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """A prepared-corpus directory of random tokens (train + val), through the data writer."""
    from cratelm.data.indexed import ShardWriter, write_json_atomic

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, n in (("train", tokens), ("val", max(tokens // 20, 4096))):
        w = ShardWriter(out / f"{name}.bin", "uint16" if vocab <= 65536 else "uint32")
        w.write(rng.integers(0, vocab, n), np.array([n]))
        w.close()
        splits[name] = {"num_tokens": n, "num_documents": 1, "num_bytes": n}
    write_json_atomic(out / "meta.json", {"format": "cratelm-tokens", "format_version": 1,
                                          "dtype": "uint16" if vocab <= 65536 else "uint32",
                                          "vocab_size": vocab, "eos_id": 0, "tokenizer": None,
                                          "tokenizer_sha256": None, "splits": splits})
    return out


class PlainLoop:
    """The same model, stepped without DeepSpeed: AdamW (two groups, fused on CUDA), clipping."""

    def __init__(self, cfg, windows, device: torch.device, dtype: torch.dtype) -> None:
        from cratelm.data import BatchSampler
        from cratelm.model.crate import CrateLM
        from cratelm.train.optimizer import param_groups

        m, t, o = cfg.model, cfg.train, cfg.optim
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.model = CrateLM(m, seed=t.seed).to(device)
        self.opt = torch.optim.AdamW(param_groups(self.model.named_parameters(), o.weight_decay), lr=o.lr,
                                     betas=(o.beta1, o.beta2), eps=o.eps,
                                     **({"fused": True} if device.type == "cuda" else {}))
        self.sampler = BatchSampler(windows, t.micro_batch, 1, 0, 1, seed=cfg.data.seed)

    def step(self) -> float:
        x, y = self.sampler.next_micro_batch()
        loss_dtype = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=loss_dtype):
            loss = self.model(x.to(self.device), y.to(self.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def interleaved(cfg, steps: int, workdir: Path, device: torch.device, dtype: torch.dtype) -> tuple[list, list]:
    """Seconds per step of `cratelm train`'s step (Engine.train_step: the DeepSpeed engine's
    forward/backward/step, the per-step all-reduce, the LR, the data) and of the plain loop,
    alternating step by step so that both see the same machine load."""
    from cratelm.train.schedule import lr_at, set_lr
    from cratelm.train.trainer import Trainer, prepare
    from cratelm.train.ds_config import device_type
    from cratelm.train.engine import init_distributed, quiet_deepspeed

    corpus = write_random_corpus(workdir / "corpus", cfg.model.vocab_size,
                                 tokens=(2 * steps + 4) * cfg.train.micro_batch * (cfg.model.context + 1) + 1)
    cfg.data.train, cfg.data.val = [str(corpus)], ""
    cfg.train.run_dir = str(workdir / "run")
    plan, config, data, _ = prepare(cfg)
    init_distributed(device_type())
    quiet_deepspeed()
    trainer = Trainer(cfg, plan, config, data, None)
    trainer._setup()
    plain = PlainLoop(cfg, data.train, device, dtype)
    t_eng, t_plain = [], []
    for s in range(steps):
        set_lr(trainer.engine.optimizer, lr_at(s, cfg.optim, cfg.train.max_steps))
        sync(device)
        t0 = time.perf_counter()
        trainer.engine.train_step(trainer.sampler)
        sync(device)
        t_eng.append(time.perf_counter() - t0)
        for g in plain.opt.param_groups:
            g["lr"] = lr_at(s, cfg.optim, cfg.train.max_steps)
        sync(device)
        t0 = time.perf_counter()
        plain.step()
        sync(device)
        t_plain.append(time.perf_counter() - t0)
    trainer.metrics.close()
    return t_eng, t_plain


def summarize(name: str, times: list[float], warmup: int, tokens_per_step: int, flops_per_token: int,
              peak: float | None) -> dict:
    med = statistics.median(times[warmup:])
    tps = tokens_per_step / med
    tflops = tps * flops_per_token / 1e12
    return {"name": name, "step_ms": 1e3 * med, "min_step_ms": 1e3 * min(times[warmup:]), "tokens_per_s": tps,
            "tflops": tflops, "mfu": tflops / peak if peak else None, "steps_timed": len(times) - warmup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cratelm.bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="crate-gpt")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", default=None, help="fp32 / bf16 / fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="train.compile for the engine (torch.compile)")
    p.add_argument("--peak-tflops", default=None, help="a number, 'table', or 'measured' (default on CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from cratelm.config import load_config
    from cratelm.model.accounting import flops_per_token
    from cratelm.train.metrics import peak_tflops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    overrides = [f"model.arch={args.arch}", f"model.d_model={args.d_model}", f"model.n_layer={args.n_layer}",
                 f"model.n_head={args.n_head}", f"model.vocab_size={args.vocab_size}", f"model.context={args.context}",
                 f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", f"train.max_steps={args.steps}",
                 f"train.zero_stage={args.zero_stage}", f"train.precision={precision}", "train.log_interval=1",
                 "train.eval_interval=0", "train.diag_interval=0", "train.ckpt_interval=0", "train.keep_last=1",
                 "optim.warmup_steps=2", f"train.compile={str(args.compile).lower()}"]
    cfg = load_config(overrides=overrides)
    peak_arg = args.peak_tflops or ("table" if cuda else "measured")
    if peak_arg == "measured":
        peak = measured_matmul_tflops(device, dtype)
        peak_desc = f"best {precision} 2048^3 matmul here: {peak:.3f} TFLOP/s"
    elif peak_arg == "table":
        peak = peak_tflops(None, device)
        peak_desc = f"table: {peak} TFLOP/s" if peak else "unknown device: no MFU"
    else:
        peak = float(peak_arg)
        peak_desc = f"given: {peak} TFLOP/s"
    fpt = flops_per_token(cfg.model, cfg.model.context)
    tokens = args.micro_batch * args.context

    with tempfile.TemporaryDirectory(prefix="cratelm-bench-") as tmp:
        t_eng, t_plain = interleaved(cfg, args.steps, Path(tmp), device, dtype)
    plain = summarize("plain torch loop (AdamW)", t_plain, args.warmup, tokens, fpt, peak)
    eng = summarize(f"cratelm train (DeepSpeed ZeRO-{args.zero_stage})", t_eng, args.warmup, tokens, fpt, peak)
    rows = [plain, eng]
    ratio = eng["step_ms"] / plain["step_ms"]
    rows_json = {"ratio_median": ratio, "ratio_min": eng["min_step_ms"] / plain["min_step_ms"]}
    if int(os.environ.get("RANK", 0)) == 0:
        dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        print(f"\n{args.arch} d={args.d_model} L={args.n_layer} heads={args.n_head} T={args.context} "
              f"micro_batch={args.micro_batch} vocab={args.vocab_size}, {precision}, {dev}")
        print(f"model FLOPs/token {fpt:,}; peak for MFU: {peak_desc}; median of {plain['steps_timed']} steps "
              f"after {args.warmup} warm-up")
        print(f"{'':34s} {'step ms':>9s} {'min ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>9s} {'MFU':>7s}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['name']:34s} {r['step_ms']:9.1f} {r['min_step_ms']:8.1f} {r['tokens_per_s']:10.0f} "
                  f"{r['tflops']:9.4f} {mfu:>7s}")
        print(f"overhead: cratelm train step time / plain = {ratio:.3f} (median), "
              f"{eng['min_step_ms'] / plain['min_step_ms']:.3f} (fastest step)")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, **rows_json, "peak_tflops": peak,
                                                   "config": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
