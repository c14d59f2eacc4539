"""The comparison's figures (matplotlib, no display): loss against tokens and against FLOPs,
and the per-layer white-box measurements at the end of training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _save(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def plot_all(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """OUT/loss_vs_tokens.png, OUT/loss_vs_flops.png, OUT/whitebox.png from compare's table rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r["status"] == "finished"]
    paths = []
    for name, scale, xlabel in (("loss_vs_tokens", False, "tokens seen"),
                                ("loss_vs_flops", True, "training FLOPs (forward + backward, model FLOPs)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in done:
            xs = [t * r["flops_per_token"] if scale else t for t in r["curve"]["tokens"]]
            ax.plot(xs, r["curve"]["val_loss"], marker="o", label=f"{r['run']} ({r['params'] / 1e6:.2f}M)")
        ax.set(xlabel=xlabel, ylabel="validation loss (nats/token)", title=f"validation loss against {xlabel}")
        if scale:
            ax.set_xscale("log")
        ax.legend()
        paths.append(out / f"{name}.png")
        _save(fig, paths[-1])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        if r["compression"]:
            layers = range(len(r["compression"]))
            axes[0].plot(layers, r["compression"], marker="o", label=r["run"])
            axes[1].plot(layers, r["sparsity"], marker="o", label=r["run"])
    axes[0].set(xlabel="layer", ylabel="coding rate in - out", title="compression per layer (MSSA), end of training")
    axes[1].set(xlabel="layer", ylabel="fraction of zeros", ylim=(0, 1), title="ISTA sparsity per layer, end of training")
    for a in axes:
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))       # layers are integers
        if a.lines:
            a.legend()
        else:
            a.text(0.5, 0.5, "no CRATE run with diagnostics", ha="center", transform=a.transAxes)
    paths.append(out / "whitebox.png")
    _save(fig, paths[-1])
    return paths
