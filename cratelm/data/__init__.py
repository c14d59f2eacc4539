"""Data: a lossless sentencepiece tokenizer, indexed token shards, and the resumable sampler.

    from cratelm.data import Tokenizer, IndexedTokens, TokenWindows, BatchSampler

Preparing corpora: `cratelm.data.prepare.prepare_corpus` (``cratelm prepare-data``); the
shard format: docs/data-format.md.
"""

from cratelm.data.dataset import BatchSampler, TokenWindows
from cratelm.data.corpus import IndexedTokens
from cratelm.data.indexed import ShardFormatError
from cratelm.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["BatchSampler", "IndexedTokens", "ShardFormatError", "TokenWindows", "Tokenizer", "train_tokenizer"]
