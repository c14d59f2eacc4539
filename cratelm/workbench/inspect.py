"""``cratelm inspect``: what each sparse code unit and each subspace of a model encodes.

    cratelm inspect --checkpoint runs/x/model --data data/stdlib/val.bin --tokens 200000 --out report/

streams N tokens through the model in bounded memory (cratelm.workbench.stats) and writes a
static report (no server): OUT/index.html (per-layer compression and sparsity on this data,
the most interpretable-looking units first, and how clamping some of them changes the
next-token distribution), OUT/layer_XX.html (per head: coding rate and the tokens that
attend most to each other; per unit: top-k activating contexts with the firing token
highlighted, activation frequency; dead units) and OUT/report.json (all of it).

Any model cratelm loads works: an exported model, a run directory, an imported authors'
checkpoint, and the gpt2 baseline, whose MLP neurons stand in for code units.

"Interpretable-looking" (the summary's order): a unit's score is the share of its top
contexts whose firing token is its most common firing token, times (1 - its activation
frequency): high for units that fire rarely and, when they fire hardest, on one token.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cratelm.model.crate import CrateLM
from cratelm.workbench.stats import SampleStats, collect

BEFORE, AFTER = 12, 3      # context tokens shown around a firing token (within its window)


def unit_rows(stats: SampleStats, layer: int, tokens: np.ndarray) -> list[dict[str, Any]]:
    """One dict per unit: frequency, dead, top contexts (firing ones only), concentration, score."""
    st = stats.layers[layer]
    rows = []
    for u in range(st.units):
        top = [(int(p), float(v)) for p, v in zip(st.top_pos[u], st.top_val[u]) if p >= 0 and v > 0]
        firing = [int(tokens[p]) for p, _ in top]
        common = Counter(firing).most_common(1)
        concentration = common[0][1] / len(top) if top else 0.0
        freq = int(st.fires[u]) / stats.tokens
        rows.append({"unit": u, "fires": int(st.fires[u]), "frequency": freq, "dead": int(st.fires[u]) == 0,
                     "max_activation": top[0][1] if top else float(st.top_val[u, 0]),
                     "concentration": concentration, "top_token": common[0][0] if common else None,
                     "score": concentration * (1.0 - freq),
                     "top": [context(tokens, p, v, stats) for p, v in top]})
    return rows


def context(tokens: np.ndarray, pos: int, activation: float, stats: SampleStats) -> dict[str, Any]:
    """The firing token at stream position ``pos`` and its neighbours inside the model's window."""
    start = (pos // stats.window) * stats.window
    end = min(start + stats.window, stats.tokens)
    return {"pos": pos, "token": int(tokens[pos]), "activation": activation,
            "before": [int(t) for t in tokens[max(start, pos - BEFORE):pos]],
            "after": [int(t) for t in tokens[pos + 1:min(end, pos + 1 + AFTER)]]}


def layer_report(stats: SampleStats, layer: int, tokens: np.ndarray) -> dict[str, Any]:
    st, n = stats.layers[layer], stats.windows
    heads = []
    for h in range(st.heads):
        pairs = [{"query_pos": int(q), "key_pos": int(k), "query_token": int(tokens[q]), "key_token": int(tokens[k]),
                  "weight": float(w), "lift": float(v)}
                 for (q, k), w, v in zip(st.pair_pos[h], st.pair_w[h], st.pair_val[h]) if q >= 0]
        heads.append({"head": h, "coding_rate": st.head_rate[h] / n, "pairs": pairs})
    units = unit_rows(stats, layer, tokens)
    dead = [u["unit"] for u in units if u["dead"]]
    return {"layer": layer, "coding_rate_in": st.rate_in / n, "coding_rate_out": st.rate_out / n,
            "compression": (st.rate_in - st.rate_out) / n,
            "sparsity": 1.0 - float(st.fires.sum()) / (stats.tokens * st.units),
            "dead_units": dead, "dead_fraction": len(dead) / st.units, "heads": heads, "units": units}


def top_units(layers: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The n most interpretable-looking live units over all layers (score, then max activation)."""
    live = [(lay["layer"], u) for lay in layers for u in lay["units"] if u["top"]]
    live.sort(key=lambda lu: (-lu[1]["score"], -lu[1]["max_activation"], lu[0], lu[1]["unit"]))
    return [{"layer": layer, **{k: u[k] for k in ("unit", "score", "frequency", "max_activation", "concentration",
                                                 "top_token")}} for layer, u in live[:n]]


def _top(probs: torch.Tensor, k: int = 5) -> list[dict[str, float]]:
    v, i = probs.topk(k)
    return [{"token": int(t), "p": float(p)} for p, t in zip(v, i)]


def edit_effects(model: CrateLM, tokens: np.ndarray, layers: list[dict[str, Any]], units: list[dict[str, Any]],
                 stats: SampleStats, contexts: int = 3) -> list[dict[str, Any]]:
    """For each unit: on its top contexts, the next-token distribution as is, with the unit
    clamped to 0 (ablated) and to twice its largest activation on the sample (amplified)."""
    from cratelm.workbench.edit import next_token_probs

    out = []
    for entry in units:
        layer, unit = entry["layer"], entry["unit"]
        row = layers[layer]["units"][unit]
        amplify = 2.0 * row["max_activation"]
        cases = []
        for ctx in row["top"][:contexts]:
            start = (ctx["pos"] // stats.window) * stats.window
            prefix = torch.as_tensor(np.asarray(tokens[start:ctx["pos"] + 1], dtype=np.int64),
                                     device=model.head_weight.device)
            base = next_token_probs(model, prefix)
            cases.append({"pos": ctx["pos"], "as_is": _top(base),
                          "ablated": _top(next_token_probs(model, prefix, [(layer, unit, 0.0)])),
                          "amplified": _top(next_token_probs(model, prefix, [(layer, unit, amplify)]))})
        out.append({"layer": layer, "unit": unit, "amplified_value": amplify, "contexts": cases})
    return out


def inspect(model: CrateLM, tokens: np.ndarray, out_dir: str | Path, n_tokens: int = 100_000,
            window: int | None = None, batch: int = 4, k: int = 10, pairs: int = 10, summary_units: int = 30,
            edit_units: int = 5, edit: list[tuple[int, int]] = (), tokenizer=None, source: dict[str, Any] | None = None,
            device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Collect the statistics, write OUT/{index.html, layer_XX.html, report.json}; returns the report.
    The clamping effects are shown for the units ``edit`` (layer, unit) and the first
    ``edit_units`` of the summary."""
    from cratelm.checkpoints import atomic_dir
    from cratelm.workbench import html

    stats = collect(model, tokens, n_tokens, window, batch, k, pairs, device, progress)
    layers = [layer_report(stats, i, tokens) for i in range(model.cfg.n_layer)]
    summary = top_units(layers, summary_units)
    for layer, unit in edit:
        if not (0 <= layer < len(layers) and 0 <= unit < len(layers[layer]["units"])):
            raise ValueError(f"--edit {layer}:{unit}: no such unit (layers 0..{len(layers) - 1}, units "
                             f"0..{len(layers[0]['units']) - 1})")
    chosen = [{"layer": la, "unit": u} for la, u in edit] + summary[:edit_units]
    report = {"format": "cratelm-inspect", "version": 1, **(source or {}), "arch": model.cfg.arch,
              "tokens": stats.tokens, "windows": stats.windows, "window": stats.window, "top_k": k,
              "unit_kind": "MLP neuron (GELU)" if model.cfg.arch == "gpt2" else "ISTA code unit",
              "summary": summary, "edits": edit_effects(model, tokens, layers, chosen, stats),
              "layers": layers}
    pieces = html.Pieces(tokenizer)

    def fill(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, text in html.pages(report, pieces).items():
            (tmp / name).write_text(text, encoding="utf-8")

    atomic_dir(Path(out_dir), fill)
    return report


def parse_unit(text: str) -> tuple[int, int]:
    """``"2:17"`` -> (2, 17)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--edit {text!r} must look like LAYER:UNIT, e.g. 0:17")
    return int(m.group(1)), int(m.group(2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="exported model dir, run dir, or an authors' .pt file")
    p.add_argument("--data", required=True, help="a token shard (dir/val.bin) or a UTF-8 text file")
    p.add_argument("--out", required=True, help="report directory (index.html, layer_XX.html, report.json)")
    p.add_argument("--tokens", type=int, default=100_000, help="sample size N (the first N tokens of the data)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--top-k", type=int, default=10, help="top activating contexts kept per unit")
    p.add_argument("--edit-units", type=int, default=5, help="units of the summary whose clamping is shown")
    p.add_argument("--edit", action="append", default=[], metavar="LAYER:UNIT",
                   help="also show how clamping this unit changes the next-token distribution; repeatable")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from cratelm.checkpoints import load_model
    from cratelm.evaluate import checked_tokenizer, load_tokens, max_token_id

    try:
        edit = [parse_unit(e) for e in args.edit]
        model, meta = load_model(args.checkpoint, args.device)
        tokenizer, meta = checked_tokenizer(args.tokenizer, meta, str(args.checkpoint))
        tokens, _, label = load_tokens(args.data, tokenizer, meta)
        if (top := max_token_id(tokens)) >= model.cfg.padded_vocab:
            raise ValueError(f"{args.data} holds token id {top} but the model's vocabulary has "
                             f"{model.cfg.padded_vocab} rows")
        report = inspect(model, tokens, args.out, args.tokens, args.window, args.batch_size, args.top_k,
                         edit_units=args.edit_units, edit=edit, tokenizer=tokenizer,
                         source={"checkpoint": str(args.checkpoint), "data": label}, device=args.device,
                         progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"cratelm inspect: error: {e}", file=sys.stderr)
        return 2
    print(f"cratelm inspect: {report['tokens']} tokens, {len(report['layers'])} layers -> {Path(args.out) / 'index.html'}")
    return 0
