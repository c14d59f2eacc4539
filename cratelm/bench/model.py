"""``cratelm bench``: time a forward + backward + AdamW step of a model, bare (no DeepSpeed).

Prints one markdown row per variant: tokens/s, model TFLOP/s (FLOPs counted explicitly by
cratelm.model.accounting), MFU against the device's DATASHEET peak (dense bf16, fp32
accumulate: cratelm.train.metrics.PEAK_BF16_TFLOPS, the trainer's MFU; "-" on a CPU or an
unknown GPU), the fraction of a matmul rate measured on the same device in the same run
(bf16 on CUDA, the run's dtype on CPU; a separate, higher figure), and peak memory.

    cratelm bench --config configs/model/crate-gpt2-base.yaml --batch 16 --dtype bf16   # one GPU
    cratelm bench --config configs/model/tiny.yaml --variants fast,authors --dtype fp32   # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from cratelm.commands import add_config_arguments, config_from_args
from cratelm.config import ModelConfig
from cratelm.model import CrateLM, flops_per_token
from cratelm.train.metrics import peak_tflops
from cratelm.utils import measured_matmul_tflops, sync

# variant -> model config changes. "fast" is the config as given (cratelm's defaults: sdpa on
# q=k=v, two-matmul ISTA, chunked loss); "triton" our Triton kernels: tied-QKV attention and
# the ISTA GEMM with its shrink epilogue; "authors" the authors' formulation: explicit
# attention, three-matmul ISTA, full logits.
VARIANTS: dict[str, dict] = {
    "fast": {},
    "triton": {"attn_backend": "triton", "ista_impl": "triton", "loss_impl": "chunked"},
    "authors": {"attn_backend": "reference", "ista_impl": "authors", "loss_impl": "plain"},
    "gpt2": {"arch": "gpt2", "attn_backend": "sdpa", "ista_impl": "torch"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_model(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                steps: int = 10, warmup: int = 3, compile: bool = False) -> dict[str, float]:
    """Mean time of a training step (forward, backward, AdamW) after ``warmup`` steps."""
    model = CrateLM(cfg, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile else model
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = step_model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * seq_len
    out = {"step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
           "tflops": flops_per_token(cfg, seq_len) * tokens / dt / 1e12}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


@torch.no_grad()
def bench_eval(cfg: ModelConfig, n_windows: int, batch: int, device: torch.device,
               dtype: torch.dtype) -> dict[str, float]:
    """Evaluation throughput: `cratelm eval`'s batched scorer against a naive loop that runs one
    window at a time and takes log-softmax of its full logits. Both score the same tokens."""
    import numpy as np

    from cratelm.evaluate import score_stream

    model = CrateLM(cfg, seed=0).to(device).eval()
    C = cfg.context
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=n_windows * C + 1)
    score_stream(model, tokens[: 2 * C + 1], C, C, batch, device, dtype)       # warm-up
    sync(device)
    t0 = time.perf_counter()
    nll, n = score_stream(model, tokens, C, C, batch, device, dtype)
    sync(device)
    fast = time.perf_counter() - t0
    stream = torch.as_tensor(tokens, device=device)
    naive_nll = 0.0
    t0 = time.perf_counter()
    for b in range(0, len(tokens) - 1, C):
        x, y = stream[b:b + C][None], stream[b + 1:b + C + 1]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)[0, : len(y)]
        naive_nll -= torch.log_softmax(logits.float(), -1).gather(1, y[:, None]).sum().item()
    sync(device)
    naive = time.perf_counter() - t0
    return {"tokens": n, "eval_tokens_per_s": n / fast, "naive_tokens_per_s": n / naive,
            "speedup": naive / fast, "loss": nll / n, "naive_loss": naive_nll / n}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--variants", default="fast,authors,gpt2", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: model.context")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", action="store_true",
                   help="also time the full `cratelm train` step (DeepSpeed ZeRO-1) against a plain loop")
    p.add_argument("--eval", type=int, default=0, metavar="WINDOWS",
                   help="also time evaluation over this many context-long windows (batched vs one at a time)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="size of the n^3 matmul whose rate is measured (default 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet peak for MFU (default: the table entry of this GPU; none on CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args).model
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    T = args.seq_len or cfg.context
    peak_dtype = torch.bfloat16 if device.type == "cuda" else dtype
    measured = measured_matmul_tflops(device, peak_dtype, args.matmul_n)
    datasheet = peak_tflops(args.peak_tflops, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; datasheet peak {datasheet or 'unknown'} TFLOP/s (dense bf16); measured "
          f"{str(peak_dtype).split('.')[-1]} matmul rate {measured:.2f} TFLOP/s; {dtype_name}, batch {args.batch}, "
          f"T {T}, d {cfg.d_model}, L {cfg.n_layer}, compile={args.compile}\n")
    print("| variant | tokens/s | step ms | model TFLOP/s | MFU (datasheet) | fraction of measured matmul "
          "| peak mem GiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for v in filter(None, args.variants.split(",")):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
        vcfg = dataclasses.replace(cfg, **VARIANTS[v])
        r = bench_model(vcfg, args.batch, T, dtype, device, args.steps, args.warmup, args.compile)
        r |= {"variant": v, "mfu": r["tflops"] / datasheet if datasheet else None, "datasheet_tflops": datasheet,
              "matmul_fraction": r["tflops"] / measured, "measured_matmul_tflops": measured,
              "device": name, "dtype": dtype_name}
        rows.append(r)
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        print(f"| {v} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.3f} | {mfu} | "
              f"{r['matmul_fraction']:.3f} | {mem} |", flush=True)
    if len(rows) > 1 and rows[0]["variant"] == "fast" and any(r["variant"] == "authors" for r in rows):
        authors = next(r for r in rows if r["variant"] == "authors")
        print(f"\nfast / authors speed-up: {rows[0]['tokens_per_s'] / authors['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.eval:
        r = bench_eval(cfg, args.eval, args.batch, device, dtype)
        print(f"\neval over {r['tokens']:,} tokens (context {cfg.context}, batch {args.batch}): "
              f"{r['eval_tokens_per_s']:,.0f} tokens/s; naive per-window loop {r['naive_tokens_per_s']:,.0f} "
              f"tokens/s; speed-up {r['speedup']:.2f}x; loss {r['loss']:.6f} vs {r['naive_loss']:.6f}")
    if args.train:
        from cratelm.bench import train as train_bench

        print("\nthe full `cratelm train` step (DeepSpeed engine) against the same model in a plain loop:")
        train_bench.main([f"--arch={cfg.arch}", f"--d-model={cfg.d_model}", f"--n-layer={cfg.n_layer}",
                          f"--n-head={cfg.n_head}", f"--vocab-size={cfg.vocab_size}", f"--context={T}",
                          f"--micro-batch={args.batch}", f"--steps={args.steps + args.warmup}",
                          f"--warmup={args.warmup}", "--zero-stage=1", f"--precision={dtype_name}",
                          f"--peak-tflops={datasheet or 'measured'}", *(["--compile"] if args.compile else [])])
    return 0
