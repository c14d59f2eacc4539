"""Keep a launch's processes together: nothing a launcher starts outlives it, a stop signal
reaches the ranks, and lost console output never kills a rank.

- ``python -m cratelm.launch_guard [--stop-ok] -- CMD ...`` runs CMD (torchrun, or one rank)
  as a *child subreaper*: torchrun's workers start their own sessions, so a SIGKILL of
  torchrun (or a SLURM step ended under ``proctrack/pgid``) would leave them running and
  writing into the run directory. Orphans reparent to the guard instead, and when CMD ends
  the guard sends SIGTERM to every process left below it, then SIGKILL after ``--grace``
  seconds. SIGTERM/SIGINT/SIGUSR1/SIGHUP to the guard are passed on to CMD. With
  ``--stop-ok`` the guard exits 0 when CMD stopped after such a signal or with 75 (the
  ranks' "checkpointed, relaunch me"): srun's ``--kill-on-bad-exit`` then does not kill the
  other tasks while rank 0 still writes ``status.json``; the job script reads the outcome
  from ``status.json``. What it cannot do: survive its own SIGKILL (then the orphans go to
  init; SLURM's ``proctrack/linuxproc``/``cgroup`` still finds them, ``pgid`` does not).
- ``guard_console()`` (called by ``python -m cratelm``) makes a write to a closed stdout or
  stderr (the ssh channel of a pdsh launch that went away, a pipe closed by a reader) send
  that stream to /dev/null instead of raising BrokenPipeError in the middle of a step.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import subprocess
import sys
import time

EXIT_PREEMPTED = 75          # cratelm.train.trainer's exit status after a checkpoint on a signal
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
PR_SET_CHILD_SUBREAPER = 36


# ----------------------------------------------------------------------------- console

class _Console:
    """A text stream whose writes never raise because the reader went away."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _lost(self) -> None:
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)             # the fd itself: C-level writers and Python's exit flush too
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO, errno.ECONNRESET):
                raise
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO, errno.ECONNRESET):
                raise
            self._lost()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_console() -> None:
    """Wrap sys.stdout and sys.stderr (once) so that a lost reader never raises."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Console):
            setattr(sys, name, _Console(stream))


# ----------------------------------------------------------------------------- process guard

def _children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_leftovers(grace: float) -> list[int]:
    """SIGTERM every process below this one, SIGKILL what is left after ``grace`` s; their pids."""
    seen: list[int] = []
    deadline = time.monotonic() + grace
    while True:
        _reap()
        left = _children(os.getpid())
        if not left:
            return seen
        sig = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        for pid in left:
            if pid not in seen:
                seen.append(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run_guarded(cmd: list[str], stop_ok: bool = False, grace: float = 10.0) -> int:
    """Run ``cmd`` as described in the module docstring; returns the exit status to use."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"cratelm.launch_guard: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
    got: list[int] = []
    pending: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        got.append(signum)
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        child = subprocess.Popen(cmd)
        for s in pending:                   # a signal between the handler and the start
            child.send_signal(s)
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        left = kill_leftovers(grace)
        if left:
            print(f"cratelm.launch_guard: stopped {len(left)} process(es) left behind by {cmd[0]}: "
                  f"{' '.join(map(str, left))}", file=sys.stderr)
    if rc < 0:
        rc = 128 - rc
    if stop_ok and rc != 0 and (got or rc == EXIT_PREEMPTED):
        print(f"cratelm.launch_guard: {os.path.basename(cmd[0])} stopped with {rc} after "
              f"{', '.join(signal.Signals(s).name for s in got) or 'no signal'}; reporting 0 (see status.json)",
              file=sys.stderr)
        return 0
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cratelm.launch_guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--stop-ok", action="store_true", help="exit 0 when CMD stopped after a signal, or with 75")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL of leftovers")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command")
    return run_guarded(cmd, a.stop_ok, a.grace)


if __name__ == "__main__":
    sys.exit(main())
