"""Tokenize corpora into indexed token shards (thin wrapper over cratelm.data.prepare).

Usage (from the repository root):

    python data_prep/tokenize_corpus.py data/raw/ --tokenizer data/tok/mine.model --out data/mine
    python data_prep/tokenize_corpus.py 'shards/*.jsonl' --text-key text --out data/web \\
        --val 0.001 --test 1000 --num-proc 16
    python data_prep/tokenize_corpus.py hf:Salesforce/wikitext --hub-config wikitext-103-raw-v1 \\
        --one-doc-per-line --out data/wikitext          # needs the network (or the datasets cache)

Inputs: .txt and other text files (one document per file, or per line with
--one-doc-per-line), .jsonl / .json (--text-key), .parquet, directories, globs, hf:NAME.
Without --tokenizer a tokenizer is trained on the same inputs first (--vocab-size ...).
OUT/ gets part-00000-of-00001/ (token files and indexes of train, val, test with --test),
tokenizer.model, meta.json (format: docs/data-format.md); with --num-shards N --shard-index I
one part of N (launch/prepare_array.sbatch runs them as a SLURM array). Prints a summary: documents, tokens, bytes, tokens/s, and
the inputs skipped and why. Same as `cratelm prepare-data`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cratelm.data.cli import add_prepare_data_arguments as add_arguments, run_prepare_data as run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
