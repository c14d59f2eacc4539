"""Static HTML pages of an inspect report: index.html and one layer_XX.html per layer.

Plain HTML5 with a small inline style sheet; every text from the data is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 80em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
.ctx { font-family: monospace; white-space: pre; }
.fire { background: #fc6; font-weight: bold; }
.dim { color: #888; }
"""


class Pieces:
    """Token id -> display text (the tokenizer's piece, newlines and tabs made visible)."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
            if not text or text == "\ufffd":
                text = f"<{token}>"
            self.cache[token] = text.replace("\n", "\u21b5").replace("\t", "\u21e5")
        return self.cache[token]


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """``rows`` hold HTML already (escape the data before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def layer_file(layer: int) -> str:
    return f"layer_{layer:02d}.html"


def ctx_html(ctx: dict[str, Any], piece: Pieces) -> str:
    before = escape("".join(piece(t) for t in ctx["before"]))
    after = escape("".join(piece(t) for t in ctx["after"]))
    return (f'<span class="ctx">{before}<span class="fire">{escape(piece(ctx["token"]))}</span>{after}</span>'
            f' <span class="dim">{ctx["activation"]:.3g}</span>')


def _tokens(entries: list[dict[str, float]], piece: Pieces) -> str:
    return " ".join(f'<span class="ctx">{escape(piece(e["token"]))}</span> {e["p"]:.2f}' for e in entries)


def index_page(report: dict[str, Any], piece: Pieces) -> str:
    kind = report["unit_kind"]
    parts = [f"<p>{escape(report['arch'])}; {report['tokens']:,} tokens in {report['windows']} windows of "
             f"{report['window']}; checkpoint {escape(str(report.get('checkpoint', '-')))}, data "
             f"{escape(str(report.get('data', '-')))}. Units are {escape(kind)}s. All numbers: "
             f'<a href="report.json">report.json</a>.</p>', "<h2>Layers</h2>"]
    rows = [[f'<a href="{layer_file(lay["layer"])}">layer {lay["layer"]}</a>', f'{lay["coding_rate_in"]:.3f}',
             f'{lay["coding_rate_out"]:.3f}', f'{lay["compression"]:.3f}', f'{lay["sparsity"]:.3f}',
             f'{len(lay["dead_units"])} / {len(lay["units"])}'] for lay in report["layers"]]
    parts.append(table(["layer", "coding rate in", "coding rate out", "compression (in - out)",
                        "sparsity (fraction not firing)", "dead units"], rows))
    parts.append("<h2>Most interpretable-looking units</h2><p>Score: share of the top contexts on the most "
                 "common firing token &times; (1 - activation frequency).</p>")
    rows = []
    for u in report["summary"]:
        lay = report["layers"][u["layer"]]
        unit = lay["units"][u["unit"]]
        link = f'<a href="{layer_file(u["layer"])}#u{u["unit"]}">{u["layer"]}:{u["unit"]}</a>'
        ctxs = "<br>".join(ctx_html(c, piece) for c in unit["top"][:3])
        rows.append([link, f'{u["score"]:.3f}', f'{u["frequency"]:.4f}', f'{u["max_activation"]:.3g}', ctxs])
    parts.append(table(["layer:unit", "score", "frequency", "max activation", "top contexts"], rows))
    if report["edits"]:
        parts.append("<h2>Editing units</h2><p>The next-token distribution on a unit's top contexts, as is, "
                     "with the unit clamped to 0 (ablated) and to twice its largest activation (amplified): "
                     "<code>cratelm generate --clamp LAYER:UNIT=VALUE</code>.</p>")
        rows = []
        for e in report["edits"]:
            unit = report["layers"][e["layer"]]["units"][e["unit"]]
            for case, ctx in zip(e["contexts"], unit["top"]):
                rows.append([f'{e["layer"]}:{e["unit"]}', ctx_html(ctx, piece), _tokens(case["as_is"], piece),
                             _tokens(case["ablated"], piece),
                             f'= {e["amplified_value"]:.3g}: ' + _tokens(case["amplified"], piece)])
        parts.append(table(["layer:unit", "context", "next token as is", "ablated (0)", "amplified"], rows))
    return page(f"cratelm inspect: {report['arch']}", "\n".join(parts))


def layer_page(report: dict[str, Any], lay: dict[str, Any], piece: Pieces) -> str:
    parts = ['<p><a href="index.html">back to the summary</a></p>',
             f"<p>Coding rate in {lay['coding_rate_in']:.3f}, out {lay['coding_rate_out']:.3f}, compression "
             f"{lay['compression']:.3f}; sparsity {lay['sparsity']:.3f}; {len(lay['dead_units'])} dead units of "
             f"{len(lay['units'])}.</p>", "<h2>Heads (subspaces)</h2>"]
    rows = []
    for h in lay["heads"]:
        pairs = "<br>".join(
            f'<span class="ctx">{escape(piece(p["query_token"]))}</span> &larr; '
            f'<span class="ctx">{escape(piece(p["key_token"]))}</span> '
            f'<span class="dim">w {p["weight"]:.2f}, {p["lift"]:.1f}&times; uniform</span>' for p in h["pairs"])
        rows.append([str(h["head"]), f'{h["coding_rate"]:.3f}', pairs])
    parts.append(table(["head", "coding rate", "tokens attending most to each other (query \u2190 key)"], rows))
    parts.append(f"<h2>Units ({escape(report['unit_kind'])}s), most interpretable-looking first</h2>")
    rows = []
    for u in sorted(lay["units"], key=lambda u: (-u["score"], -u["max_activation"], u["unit"])):
        if u["dead"]:
            continue
        ctxs = "<br>".join(ctx_html(c, piece) for c in u["top"])
        rows.append([f'<a id="u{u["unit"]}">{u["unit"]}</a>', f'{u["score"]:.3f}', f'{u["frequency"]:.4f}',
                     f'{u["concentration"]:.2f}', ctxs])
    parts.append(table(["unit", "score", "frequency", "top-token share", "top contexts"], rows))
    dead = ", ".join(f'<a id="u{u}">{u}</a>' for u in lay["dead_units"]) or "none"
    parts.append(f"<h2>Dead units (never fire on the sample)</h2>\n<p>{dead}</p>")
    return page(f"layer {lay['layer']}: {report['arch']}", "\n".join(parts))


def pages(report: dict[str, Any], piece: Pieces) -> dict[str, str]:
    """File name -> HTML text of every page."""
    out = {"index.html": index_page(report, piece)}
    for lay in report["layers"]:
        out[layer_file(lay["layer"])] = layer_page(report, lay, piece)
    return out
