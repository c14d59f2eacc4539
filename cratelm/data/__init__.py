"""Data: a lossless sentencepiece tokenizer, indexed token shards, and the resumable sampler.

    from cratelm.data import Tokenizer, IndexedTokens, TokenWindows, BatchSampler

Preparing corpora: `cratelm.data.prepare.prepare_corpus` (``cratelm prepare-data``; reading
in tasks.py and reading.py, workers in pipeline.py), checking them: `cratelm.data.verify`
(``cratelm verify-data``), the command lines: cli.py; the format: docs/data-format.md.
"""

from cratelm.data.dataset import BatchSampler, TokenWindows
from cratelm.data.corpus import IndexedTokens
from cratelm.data.indexed import ShardFormatError
from cratelm.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["BatchSampler", "IndexedTokens", "ShardFormatError", "TokenWindows", "Tokenizer", "train_tokenizer"]
