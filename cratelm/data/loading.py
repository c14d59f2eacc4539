"""Opening a job's data: the token shards of ``data.train`` / ``data.val``, checked against
the model config (cheap: windows are read on demand with pread; every rank opens them
before the process group)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cratelm.config import ConfigError, JobConfig
from cratelm.data.dataset import TokenWindows


@dataclasses.dataclass
class Data:
    train: TokenWindows
    val: TokenWindows | None
    tokenizer: Path | None
    """The tokenizer file beside the first training corpus, when it is there."""
    tokenizer_sha256: str | None


def _split_path(path: str, split: str) -> str:
    p = Path(path)
    return str(p / f"{split}.bin") if p.is_dir() else path


def open_data(cfg: JobConfig) -> Data:
    """Open the token shards (memory maps: cheap) and check them against the model config."""
    d, m = cfg.data, cfg.model
    if not d.train:
        raise ConfigError("data.train is empty: give one or more prepared corpora (dir or dir/train.bin)")
    try:
        train = TokenWindows([_split_path(p, "train") for p in d.train], m.context, d.weights or None, seed=d.seed)
        val = TokenWindows([_split_path(d.val, "val")], m.context, seed=d.seed) if d.val else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    for c in train.corpora + (val.corpora if val else []):
        vocab = int(c.meta.get("vocab_size", 0))
        if vocab > m.vocab_size:
            raise ConfigError(f"data: {c.bin_path} has vocab_size={vocab} but model.vocab_size={m.vocab_size}")
    first = train.corpora[0]
    tok = first.meta.get("tokenizer")
    tok_path = (first.dir / tok) if tok else None
    return Data(train, val, tok_path if tok_path and tok_path.is_file() else None, first.meta.get("tokenizer_sha256"))
