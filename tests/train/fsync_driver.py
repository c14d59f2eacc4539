"""Train with every os.fsync / os.replace recorded (one process, no launcher).

    python tests/train/fsync_driver.py CONFIG.yaml LOG.json

LOG.json: a list of ["fsync", path] / ["replace", src, dst] in call order (the path of an
fsynced descriptor is read from /proc/self/fd).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cratelm.config import load_config  # noqa: E402
from cratelm.train.trainer import train  # noqa: E402


def main() -> None:
    log: list[list[str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(["fsync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")])
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        log.append(["replace", os.path.abspath(src), os.path.abspath(dst)])
        return real_replace(src, dst, *args, **kwargs)

    os.fsync, os.replace = fsync, replace
    trainer = train(load_config([sys.argv[1]], []))
    os.fsync, os.replace = real_fsync, real_replace
    Path(sys.argv[2]).write_text(json.dumps(log))
    sys.exit(trainer.exit_code)


if __name__ == "__main__":
    main()
