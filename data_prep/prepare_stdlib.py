"""Prepare the embedded demo corpus: the Python standard library's own source.

Usage (from the repository root):

    python data_prep/prepare_stdlib.py --out data/stdlib

Reads every .py file under sysconfig.get_paths()["stdlib"] (sorted; site-packages excluded;
empty files and the few test files that are not UTF-8 are skipped and counted), trains a
lossless BPE tokenizer of 8192 pieces on it, and tokenizes it with a 0.5% validation split
(at least one document). On Python 3.11 that is ~1,760 documents, ~31.5 MB of text, ~9.8M
tokens (uint16): train ~9.7M tokens, val ~60k tokens, ready in ~10 s on 2 CPU cores. The
output is the same bytes on every run (for the same Python). Any flag of
data_prep/tokenize_corpus.py works here too (e.g. --vocab-size 16384 --val 20).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cratelm.data.cli import add_prepare_data_arguments as add_arguments, run_prepare_data as run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(corpus="python-stdlib", vocab_size=8192)
    sys.exit(run(parser.parse_args()))
