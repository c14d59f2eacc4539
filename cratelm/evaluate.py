"""``cratelm eval``: perplexity of a model on token shards or raw text.

What is scored (the same definition for every corpus; see README "Evaluation"). The data
is one token stream t_0 .. t_{N-1} (documents concatenated, each followed by EOS). Every
token after the first is scored exactly once. A window holds C = model.context input
tokens t_b .. t_{b+C-1} and predicts t_{b+1} .. t_{b+C}; windows start at b = 0, S, 2S, ...
for a stride S <= C, and each window scores only the targets no earlier window scored, so
with S < C every scored token sees at least C - S tokens of context (a sliding window).
The default S = C gives non-overlapping windows: token i is predicted from tokens
floor((i-1)/C)*C .. i-1.

Reported per corpus: tokens scored, mean cross-entropy (nats/token), perplexity
exp(loss), and bits per byte = total nats / ln 2 / UTF-8 bytes (when the byte count is
known: raw text, and shards whose meta.json records it).

    cratelm eval --checkpoint runs/demo/export --data data/stdlib/val.bin wiki.txt --json out.json
    torchrun --nproc_per_node 2 -m cratelm eval --checkpoint ... --data ...   # split over ranks
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cratelm.dist import all_reduce


LOGIT_CHUNK = 1 << 24   # logits computed at once (64 MiB in fp32)


@dataclass
class EvalResult:
    data: str
    tokens: int
    loss: float
    perplexity: float
    bits_per_byte: float | None


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Yield (begin, end, first_scored) per window: inputs t[begin:end], targets t[begin+1:end+1],
    scored targets from window position ``first_scored`` on."""
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    begin, scored_upto = 0, 0          # targets t_1 .. t_{scored_upto} are done
    while scored_upto < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        yield begin, end, scored_upto - begin
        scored_upto = end
        begin += stride


@torch.no_grad()
def score_stream(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor, context: int, stride: int,
                 batch_size: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 rank: int = 0, world: int = 1, progress: bool = False) -> tuple[float, int]:
    """(sum of NLL in nats as float64, tokens scored) over this rank's share of the windows."""
    from tqdm import tqdm

    # windows are listed and read lazily: a memory-mapped shard is never copied whole
    spans = itertools.islice(windows(len(tokens), context, stride), rank, None, world)
    total, count = 0.0, 0
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(desc="eval windows", unit="win", disable=not progress, leave=False)
    while chunk := list(itertools.islice(spans, batch_size)):
        width = max(end - begin for begin, end, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)       # -1: not scored
        for row, (begin, end, first) in enumerate(chunk):
            n = end - begin
            window = torch.from_numpy(np.asarray(tokens[begin:end + 1], dtype=np.int64))
            x[row, :n] = window[:n]
            y[row, first:n] = window[1 + first:n + 1]
        x, y = x.to(device), y.to(device)
        with autocast:
            h = model.hidden(x).flatten(0, 1)                     # (B*T, d)
        y = y.flatten()
        # the head in row chunks: never the whole (B*T, V) logits at once
        head = model.head_weight[: model.cfg.vocab_size]    # padded vocabulary rows are no tokens
        rows = max(1, LOGIT_CHUNK // head.shape[0])
        for r in range(0, h.shape[0], rows):
            with autocast:
                logits = F.linear(h[r:r + rows], head)
            nll = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, y[r:r + rows],
                                  ignore_index=-1, reduction="none")
            total += nll.double().sum().item()     # float64 sums: the same result however windows are split
        count += int((y >= 0).sum())
        bar.update(len(chunk))
    bar.close()
    return total, count


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises a gloo/nccl group when launched with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _all_sum(values: list[float]) -> list[float]:
    """Sums over ranks in float64 (on the device the process group needs), or ``values`` alone."""
    return all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def load_tokens(path: str, tokenizer, model_meta: dict) -> tuple[np.ndarray, int | None, str]:
    """The token stream of a shard (``.bin``) or raw text file, its byte count, and a label."""
    from cratelm.data import IndexedTokens

    p = Path(path)
    if p.suffix == ".bin" or (p.with_suffix(".idx").exists() and p.suffix != ".txt"):
        shard = IndexedTokens(str(p))
        want, have = model_meta.get("tokenizer_sha256"), shard.meta.get("tokenizer_sha256")
        if want and have and want != have:
            raise ValueError(f"{path} was tokenized with a tokenizer of sha256 {have}, but the model's tokenizer "
                             f"has sha256 {want}; re-tokenize the data with the model's tokenizer")
        return shard.tokens, shard.meta["splits"][shard.name].get("num_bytes"), str(p)   # lazy: sliced per window
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such shard or text file")
    if tokenizer is None:
        raise ValueError(f"{path} is raw text but the model records no tokenizer; pass --tokenizer")
    raw = p.read_bytes()    # bytes, then decode: CRLF and lone CR stay as in the file (as prepare-data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    return np.asarray(ids, dtype=np.int64), len(raw), str(p)


def max_token_id(tokens, block: int = 1 << 24) -> int:
    """The largest id of a token array or memory-mapped stream, read a block at a time."""
    return max((int(np.max(tokens[i:i + block])) for i in range(0, len(tokens), block)), default=0)


def evaluate(model: torch.nn.Module, data: list[str], model_meta: dict, tokenizer=None, stride: int | None = None,
             batch_size: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32,
             progress: bool = True) -> list[EvalResult]:
    """Score each corpus in ``data``; results are reduced over ranks when distributed."""
    rank, world = _dist()
    C = model.cfg.context
    results = []
    for path in data:
        tokens, n_bytes, label = load_tokens(path, tokenizer, model_meta)
        if (top := max_token_id(tokens)) >= model.cfg.padded_vocab:
            raise ValueError(f"{path} holds token id {top} but the model's vocabulary has "
                             f"{model.cfg.padded_vocab} rows")
        nll, n = score_stream(model, tokens, C, stride or C, batch_size, device, dtype, rank, world,
                              progress and rank == 0)
        nll, n = _all_sum([nll, float(n)])
        if n == 0:
            raise ValueError(f"{path}: fewer than 2 tokens, nothing to score")
        loss = nll / n
        bpb = nll / math.log(2) / n_bytes if n_bytes else None
        results.append(EvalResult(label, int(n), loss, math.exp(loss), bpb))
    return results


def checked_tokenizer(path: str | None, meta: dict, checkpoint: str):
    """The tokenizer to use (``path``, else the checkpoint's) and the metadata to check data
    against. A tokenizer that differs from the one the model records is refused."""
    path = path or meta.get("tokenizer")
    if not path:
        return None, meta
    from cratelm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    recorded = meta.get("tokenizer_sha256")
    if recorded and tokenizer.sha256 != recorded:
        raise ValueError(f"tokenizer {path} has sha256 {tokenizer.sha256}, but {checkpoint} was trained with "
                         f"a tokenizer of sha256 {recorded}")
    return tokenizer, {**meta, "tokenizer_sha256": recorded or tokenizer.sha256}


def markdown(results: list[EvalResult]) -> str:
    rows = ["| data | tokens | loss (nats/token) | perplexity | bits/byte |", "|---|---|---|---|---|"]
    for r in results:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        rows.append(f"| {r.data} | {r.tokens:,} | {r.loss:.4f} | {r.perplexity:.3f} | {bpb} |")
    return "\n".join(rows)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: list[str], tokenizer: str | None = None,
                        stride: int | None = None, batch_size: int = 8, device: str | None = None,
                        dtype: str | None = None, progress: bool = True, trust: bool = False) -> list[EvalResult]:
    """``cratelm eval``: load any model (`cratelm.checkpoints.load_model`), check the tokenizer
    against it, and score every corpus of ``data``. ``device`` defaults to this rank's GPU if
    any, else cpu; ``dtype`` ("fp32" / "bf16") to bf16 on GPU, fp32 on CPU. Raises ValueError /
    FileNotFoundError naming the bad file."""
    from cratelm.checkpoints import load_model

    device = device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype or ("bf16" if device != "cpu" else "fp32")]
    model, meta = load_model(checkpoint, device, trust)
    tok, meta = checked_tokenizer(tokenizer, meta, str(checkpoint))
    if not meta.get("tokenizer_sha256"):
        print(f"cratelm eval: note: {checkpoint} records no tokenizer; shards are not checked against it",
              file=sys.stderr)
    return evaluate(model, data, meta, tok, stride, batch_size, device, torch_dtype, progress)
