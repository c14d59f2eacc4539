"""Run several training jobs in ONE launched process group (saves a launch per job).

    torchrun --nproc_per_node 2 tests/train/dist_driver.py JOBS.json

JOBS.json: a list of {"config": {...sections...}, "resume": null | "auto" | PATH,
"env": {VAR: VALUE}, "dump_logits": PATH | null}. Each job goes through
cratelm.train.trainer.train (the code path of `cratelm train`); its exit code is written to
RUN_DIR/driver_exit_code. With dump_logits, the trained engine's logits on a fixed batch
(micro_batch x context tokens) are saved there: through the engine's own module for
ZeRO (parameters gathered by ZeRO-3's hooks) and through eval_batch for the pipeline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cratelm.config import config_from_dict  # noqa: E402
from cratelm.train.trainer import train  # noqa: E402


def fixed_batch(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.model.context), generator=g)


def dump_logits(trainer, path: str) -> None:
    import torch.distributed as dist

    e = trainer.engine
    idx = fixed_batch(trainer.cfg).to(e.device)
    logits = None
    with torch.no_grad():
        if e.pipeline:
            _, out = e.ds.eval_batch(iter([(idx, idx)]), return_logits=True, num_micro_batches=1)
            if e.is_last_stage:
                h, w = out
                logits = F.linear(h, w)
            save = e.is_last_stage and e.dp_rank == 0
        else:
            e.ds.eval()
            logits = e.ds.module(idx)
            e.ds.train()
            save = dist.get_rank() == 0
    if save:
        torch.save({"idx": idx.cpu(), "logits": logits.float().cpu()}, path)
    dist.barrier()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        saved_env = {k: os.environ.get(k) for k in job.get("env", {})}
        os.environ.update(job.get("env", {}))
        cfg = config_from_dict(job["config"])
        trainer = train(cfg, job.get("resume"))
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if job.get("dump_logits"):
            dump_logits(trainer, job["dump_logits"])
        if int(os.environ.get("RANK", 0)) == 0:
            Path(cfg.train.run_dir, "driver_exit_code").write_text(str(trainer.exit_code))


if __name__ == "__main__":
    main()
