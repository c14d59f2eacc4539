"""Training, data preparation and perplexity eval import no transformers, tokenizers or lm-eval
(they are the optional `hf` extra)."""

import subprocess
import sys

HF_PACKAGES = ("transformers", "tokenizers", "lm_eval", "accelerate")


def test_core_paths_import_no_hugging_face_package():
    code = (
        "import sys, deepspeed\n"
        "import cratelm.cli, cratelm.commands, cratelm.train.trainer, cratelm.train.engine, cratelm.train.export\n"
        "import cratelm.data.prepare, cratelm.data.tokenizer, cratelm.evaluate, cratelm.model, cratelm.checkpoints\n"
        "import cratelm.hf, cratelm.hf.export, cratelm.hf.convert\n"   # the bridge itself imports them lazily
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HF_PACKAGES!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"      # (DeepSpeed logs a line to stdout)
