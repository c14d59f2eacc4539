"""The main job, end to end, on the embedded corpus (the Python standard library's source).

    make demo                                   # = python -m cratelm.demo
    python -m cratelm.demo --quick              # the reduced size CI runs (about a minute)

1. prepare:  train a lossless sentencepiece tokenizer on the stdlib and tokenize it into
             DEMO/data/{train,val}.bin (skipped when DEMO/data/meta.json exists);
2. train:    a small CRATE-GPT through DeepSpeed (`cratelm train ... --resume auto`: an
             interrupted demo continues where it stopped; a finished one is not retrained);
             a few minutes on a CPU, larger and longer when a GPU is present;
3. export:   a consolidated fp32 model in DEMO/model;
4. evaluate: validation perplexity and bits per byte (DEMO/eval.json);
5. generate: a sample continuing a Python prompt (DEMO/sample.txt);
6. plot:     DEMO/curves.png, the loss curves and the per-layer coding rate (compression)
             and ISTA sparsity over training, from DEMO/run/metrics.jsonl.
TensorBoard logs are in DEMO/run/tb: `tensorboard --logdir DEMO/run/tb`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (model, training) overrides per size; the model and train YAMLs ship in configs/
SIZES = {
    "quick": dict(model=["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.context=64"],
                  train=["train.max_steps=60", "train.micro_batch=8", "train.log_interval=5",
                         "train.eval_interval=30", "train.diag_interval=15", "train.ckpt_interval=30",
                         "optim.warmup_steps=10"], vocab=1024, max_files=150, val=8),
    "cpu": dict(model=["model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.context=128"],
                train=["train.max_steps=500", "train.micro_batch=16", "train.log_interval=10",
                       "train.eval_interval=100", "train.diag_interval=50", "train.ckpt_interval=100",
                       "optim.warmup_steps=50"], vocab=4096, max_files=None, val=40),
    "gpu": dict(model=["model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.context=256"],
                train=["train.max_steps=3000", "train.micro_batch=32", "train.log_interval=20",
                       "train.eval_interval=250", "train.diag_interval=250", "train.ckpt_interval=500",
                       "optim.warmup_steps=200", "train.precision=bf16"], vocab=8192, max_files=None, val=40),
}
PROMPT = "def fibonacci(n):\n    "


def step(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(data_dir: Path, vocab: int, max_files: int | None, val: int) -> None:
    if (data_dir / "meta.json").is_file():
        print(f"{data_dir} is prepared already (delete it to redo)")
        return
    cmd = [sys.executable, "-m", "cratelm", "prepare-data", "--corpus", "python-stdlib", "--out", str(data_dir),
           "--vocab-size", str(vocab), "--val", str(val), "--num-proc", str(min(4, os.cpu_count() or 1))]
    if max_files:
        cmd += ["--max-documents", str(max_files)]
    sh(cmd)


def train(run_dir: Path, data_dir: Path, size: dict, gpu: bool) -> None:
    meta = json.loads((data_dir / "meta.json").read_text())
    cmd = [sys.executable, "-m", "cratelm", "train", "--config", str(ROOT / "configs/model/tiny.yaml"),
           str(ROOT / "configs/train/demo.yaml"), *size["model"], *size["train"],
           f"model.vocab_size={meta['vocab_size']}", f"data.train=[{data_dir / 'train.bin'}]",
           f"data.val={data_dir / 'val.bin'}", f"train.run_dir={run_dir}",
           f"train.precision={'bf16' if gpu else 'fp32'}", "--resume", "auto"]
    sh(cmd)


def plot(metrics_path: Path, png: Path) -> None:
    """Loss curves and per-layer coding rate / sparsity from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = {k for r in records for k in r}
    layers = sorted({int(k.split("/")[1].removeprefix("layer_")) for k in keys if k.startswith("diag/layer_")})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        xs, ys = series(key)
        ax.plot(xs, ys, marker="o" if key.startswith("val") else None, label=label)
    ax.set(title="cross-entropy (nats/token)", xlabel="step", ylabel="loss")
    ax.legend()
    cmap = plt.get_cmap("viridis")
    for i in layers:
        color = cmap(i / max(1, len(layers) - 1))
        xs, ys = series(f"diag/layer_{i:02d}/coding_rate_in")
        axes[1].plot(xs, ys, color=color, label=f"layer {i} MSSA input")
        xs, ys = series(f"diag/layer_{i:02d}/coding_rate_out")
        axes[1].plot(xs, ys, color=color, linestyle="--", label=f"layer {i} MSSA output")
        xs, ys = series(f"diag/layer_{i:02d}/sparsity")
        axes[2].plot(xs, ys, color=color, label=f"layer {i}")
    axes[1].set(title="coding rate R^c per layer (lower = more compressed)", xlabel="step")
    axes[2].set(title="ISTA sparsity per layer (fraction of zeros)", xlabel="step", ylim=(0, 1))
    for a in axes[1:]:
        if layers:
            a.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="where everything goes (default ./demo)")
    p.add_argument("--quick", action="store_true", help="the reduced size CI runs (~1 minute on 2 cores)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpu with CUDA, else cpu")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    size_name = "quick" if args.quick else (args.size or ("gpu" if gpu else "cpu"))
    size = SIZES[size_name]
    out = Path(args.out).resolve()
    data_dir, run_dir, model_dir = out / "data", out / "run", out / "model"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    step(f"1/6 prepare the python-stdlib corpus -> {data_dir}")
    prepare(data_dir, size["vocab"], size["max_files"], size["val"])
    step(f"2/6 train a {size_name}-size CRATE-GPT through DeepSpeed -> {run_dir}")
    train(run_dir, data_dir, size, gpu)
    step(f"3/6 export the consolidated model -> {model_dir}")
    sh([sys.executable, "-m", "cratelm", "export", str(run_dir), str(model_dir)])
    step("4/6 evaluate on the validation split")
    sh([sys.executable, "-m", "cratelm", "eval", "--checkpoint", str(model_dir), "--data",
        str(data_dir / "val.bin"), "--json", str(out / "eval.json")])
    step("5/6 generate a sample")
    with open(out / "sample.txt", "w") as f:
        cmd = [sys.executable, "-m", "cratelm", "generate", "--checkpoint", str(model_dir), "--prompt", PROMPT,
               "--max-new-tokens", "120", "--temperature", "0.8", "--top-k", "50"]
        print("$ " + " ".join(repr(c) if "\n" in c else c for c in cmd), flush=True)
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        f.write(text)
    print(text)
    step("6/6 plot the curves")
    plot(run_dir / "metrics.jsonl", out / "curves.png")

    results = json.loads((out / "eval.json").read_text())["results"][0]
    print(f"\nDone in {time.time() - t0:.0f} s. Validation: loss {results['loss']:.3f} nats/token, "
          f"perplexity {results['perplexity']:.2f}, {results['bits_per_byte'] or float('nan'):.3f} bits/byte.")
    print(f"  corpus:       {data_dir}\n  run:          {run_dir} (checkpoints, metrics.jsonl)\n"
          f"  model:        {model_dir}\n  evaluation:   {out / 'eval.json'}\n  sample:       {out / 'sample.txt'}\n"
          f"  curves:       {out / 'curves.png'}\n  TensorBoard:  tensorboard --logdir {run_dir / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
