"""`cratelm launch-check`: the hostfile read as DeepSpeed reads it, include/exclude, the
per-node commands of each launcher, the batch arithmetic and the master-port probes."""

from __future__ import annotations

import base64
import json
import shlex
import socket
import sys

import pytest

from cratelm.cli import main
from cratelm.launch_check import LaunchError, parse_hostfile, probe_master, read_hostfile, select_resources

from .conftest import REPO, free_port

TINY = str(REPO / "configs/model/tiny.yaml")

GOOD = """\
# a comment, then a blank line

worker-0 slots=4
  worker-1   slots=2   # trailing comment
worker-2 slots=8\r
"""


def check(capsys, *argv: str) -> tuple[int, str]:
    """Run `cratelm launch-check ARGV` in this process: (exit code, stdout + stderr)."""
    rc = main(["launch-check", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def check_json(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["launch-check", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


def world_info(shell: str) -> dict:
    arg = next(w for w in shlex.split(shell.replace(";", " ")) if w.startswith("--world_info="))
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


# ----------------------------------------------------------------------------- hostfile

def test_good_hostfile_parses_as_deepspeed_does(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile

    hf = tmp_path / "hostfile"
    hf.write_text(GOOD)
    pool = parse_hostfile(hf)
    assert list(pool.items()) == [("worker-0", 4), ("worker-1", 2), ("worker-2", 8)]
    assert pool == dict(_parse_hostfile(GOOD.splitlines(keepends=True)))


@pytest.mark.parametrize("line, says", [
    ("worker-1 slot=4", "unknown key 'slot'"),
    ("worker-1 slots=x", "slots='x' is not a whole number"),
    ("worker-1 slots=", "slots= has no value"),
    ("worker-1", "no slot count"),
    ("worker-1 4", "expected 'slots=N'"),
    ("worker-0 slots=2", "host 'worker-0' is already listed on line 1"),
])
def test_bad_line_is_refused_with_file_and_line(tmp_path, line, says):
    from deepspeed.launcher.runner import _parse_hostfile

    hf = tmp_path / "hostfile"
    text = f"worker-0 slots=4\n# comment\n{line}\n"
    hf.write_text(text)
    pool, problems, _ = read_hostfile(hf)
    assert len(problems) == 1 and problems[0].startswith(f"{hf}:3: ") and says in problems[0], problems
    with pytest.raises(ValueError):          # DeepSpeed refuses the same file (without a line number)
        _parse_hostfile(text.splitlines(keepends=True))
    with pytest.raises(LaunchError, match=f"{hf}:3"):
        parse_hostfile(hf)


def test_zero_slots_is_refused_though_deepspeed_accepts_it(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=4\nworker-1 slots=0\n")
    _, problems, _ = read_hostfile(hf)
    assert problems == [f"{hf}:2: 'worker-1 slots=0': slots=0, a host needs at least one slot "
                        "(delete the line, or keep it and --exclude worker-1)"]


def test_every_bad_line_is_listed_and_the_cli_exits_nonzero(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("a slot=4\nb slots=0\nc slots=x\nd slots=2\nd slots=2\n")
    rc, out = check(capsys, "--hostfile", str(hf), "--dry-run")
    assert rc == 1
    for n in (1, 2, 3, 5):
        assert f"{hf}:{n}: " in out
    assert f"{hf}:4:" not in out
    assert "4 problem(s), nothing was started" in out


def test_config_errors_are_reported(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=1\n")
    rc, out = check(capsys, "-H", str(hf), "--dry-run", "--config", TINY, "train.micro_batch=zero")
    assert rc == 1 and "config: train.micro_batch='zero' must be an integer" in out


def test_missing_and_empty_hostfiles(tmp_path, capsys):
    rc, out = check(capsys, "--hostfile", str(tmp_path / "nope"), "--dry-run")
    assert rc == 1 and "does not exist" in out
    (tmp_path / "empty").write_text("# only a comment\n\n")
    rc, out = check(capsys, "--hostfile", str(tmp_path / "empty"), "--dry-run")
    assert rc == 1 and "no hosts" in out


def test_trailing_text_after_slots_is_a_warning(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=4x\n")
    pool, problems, warnings = read_hostfile(hf)
    assert pool == {"worker-0": 4} and not problems       # DeepSpeed reads slots=4 too
    assert warnings and "ignores the rest, 'x'" in warnings[0]


# ----------------------------------------------------------------------------- include / exclude

POOL = {"worker-0": 4, "worker-1": 2, "worker-2": 8}


@pytest.mark.parametrize("kw, expect", [
    ({}, {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1], "worker-2": list(range(8))}),
    ({"include": "worker-2:0,1@worker-0"}, {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1]}),  # hostfile order
    ({"include": "worker-1:1"}, {"worker-1": [1]}),
    ({"exclude": "worker-1@worker-2:2,3,4,5,6,7"}, {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1]}),
    ({"num_nodes": 2}, {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1]}),
    ({"num_nodes": 2, "num_gpus": 2}, {"worker-0": [0, 1], "worker-1": [0, 1]}),
])
def test_selection_matches_deepspeed(kw, expect):
    assert select_resources(POOL, **kw) == expect


@pytest.mark.parametrize("kw, says", [
    ({"include": "worker-9"}, "--include 'worker-9': Hostname 'worker-9' not found in hostfile"),
    ({"include": "worker-1:0,5"}, "No slot '5' specified on host 'worker-1'"),
    ({"exclude": "worker-7:0"}, "--exclude 'worker-7:0': Hostname 'worker-7' not found"),
    ({"include": "worker-1:a"}, "write HOST[:SLOT[,SLOT...]]"),
    ({"include": "worker-0", "exclude": "worker-1"}, "mutually exclusive"),
    ({"include": "worker-0", "num_gpus": 2}, "cannot be combined"),
    ({"num_nodes": 4}, "--num_nodes 4 but only 3 host(s)"),
    ({"num_gpus": 4}, "--num_gpus 4 is more than the slots of worker-1 (slots=2)"),
    ({"exclude": "worker-0@worker-1@worker-2"}, "leave no slots"),
])
def test_bad_selection_names_the_flag_and_value(kw, says):
    with pytest.raises(LaunchError) as e:
        select_resources(POOL, **kw)
    assert says in str(e.value)


def test_unknown_include_host_is_reported_by_the_cli(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    rc, out = check(capsys, "-H", str(hf), "--include", "worker-0@worker-3:0", "--dry-run")
    assert rc == 1 and "Hostname 'worker-3' not found in hostfile" in out and "worker-0, worker-1" in out


# ----------------------------------------------------------------------------- commands

def two_node_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=4\nworker-1 slots=4\nworker-2 slots=4\n")
    return hf


def test_pdsh_commands_per_node(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = two_node_hostfile(tmp_path)
    rc, plan = check_json(capsys, "-H", str(hf), "--exclude", "worker-1@worker-2:2,3", "--master_addr", "10.0.0.1",
                          "--master_port", "29512", "--dry-run", "--config", TINY, "train.micro_batch=2",
                          "train.global_batch=12", "--resume", "auto")
    assert rc == 0, plan["problems"]
    assert plan["world_size"] == 6
    assert plan["batch"].startswith("global 12 = micro 2 x grad accum 1 x data-parallel 6")
    assert plan["head"].startswith("pdsh -S -f 1024 -w worker-0,worker-2 ")
    assert "--node_rank=%n" in plan["head"]
    assert plan["you_run"].startswith(f"deepspeed --hostfile {hf} --exclude worker-1@worker-2:2,3 ")
    nodes = plan["nodes"]
    assert [(n["host"], n["slots"], n["ranks"]) for n in nodes] == [
        ("worker-0", [0, 1, 2, 3], [0, 1, 2, 3]), ("worker-2", [0, 1], [4, 5])]
    for i, n in enumerate(nodes):
        words = shlex.split(n["shell"].split(f"cd {tmp_path};", 1)[1])
        assert words[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        assert f"--node_rank={i}" in words and "--master_addr=10.0.0.1" in words and "--master_port=29512" in words
        assert world_info(n["shell"]) == {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1]}
        tail = words[words.index("cratelm"):]
        assert tail == ["cratelm", "train", "--config", TINY, "train.micro_batch=2", "train.global_batch=12",
                        "--resume", "auto"]
        assert "--module" in words and "--no_local_rank" in words
        assert n["shell"].startswith("export PYTHONPATH=") or "export PYTHONPATH=" in n["shell"]


def test_no_ssh_and_single_host_commands(tmp_path, capsys):
    hf = two_node_hostfile(tmp_path)
    rc, plan = check_json(capsys, "-H", str(hf), "--num_nodes", "2", "--no_ssh", "--node_rank", "1",
                          "--master_addr", "worker-0", "--dry-run")
    assert rc == 0, plan["problems"]
    assert plan["head"] is None and "--no_ssh --node_rank NODE_RANK" in plan["you_run"]
    assert [("--node_rank=%d" % i) in n["shell"] for i, n in enumerate(plan["nodes"])] == [True, True]
    assert "export" not in plan["nodes"][0]["shell"]          # --no_ssh exports nothing

    hf1 = tmp_path / "one"
    hf1.write_text("localhost slots=2\n")
    rc, plan = check_json(capsys, "-H", str(hf1), "--dry-run")
    assert rc == 0 and plan["master_addr"] == "127.0.0.1" and len(plan["nodes"]) == 1
    assert "--node_rank" not in plan["nodes"][0]["shell"] and world_info(plan["nodes"][0]["shell"]) == {
        "localhost": [0, 1]}


def test_single_remote_host_would_run_here(tmp_path, capsys):
    hf = two_node_hostfile(tmp_path)
    rc, out = check(capsys, "-H", str(hf), "--include", "worker-1", "--master_addr", "127.0.0.1")
    assert rc == 1 and "not this machine: DeepSpeed would run the job here" in out


def test_openmpi(tmp_path, capsys):
    hf = two_node_hostfile(tmp_path)
    # DeepSpeed's openmpi runner passes no MASTER_ADDR/MASTER_PORT: the ranks would stop at once
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "openmpi", "--master_addr", "worker-0", "--dry-run")
    assert rc == 1 and "does not pass MASTER_ADDR/MASTER_PORT" in plan["problems"][0]
    assert "'-x MASTER_ADDR=worker-0 -x MASTER_PORT=29500'" in plan["problems"][0]
    # passed with -x (what launch/deepspeed_multinode.sh adds), a launcher_args value starting with '-'
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "openmpi", "--master_addr", "worker-0", "--dry-run",
                          "--launcher_args=--allow-run-as-root -x MASTER_ADDR=worker-0 -x MASTER_PORT=29500")
    assert rc == 0, plan["problems"]
    assert "--launcher_args=--allow-run-as-root -x MASTER_ADDR=worker-0" in plan["you_run"]
    assert plan["head"].startswith(f"mpirun -n 12 -hostfile {hf} ")
    assert "--allow-run-as-root -x MASTER_ADDR=worker-0 -x MASTER_PORT=29500" in plan["head"]
    assert "no mpi4py needed" in " ".join(plan["notes"])
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "openmpi", "--master_addr", "worker-0", "--dry-run",
                          "--launcher_args=-x MASTER_ADDR=worker-0 -x MASTER_PORT=29999")      # another port
    assert rc == 1 and "does not pass MASTER_ADDR/MASTER_PORT" in plan["problems"][0]
    assert plan["head"].endswith(f"{sys.executable} -u -m cratelm train")
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "openmpi", "--exclude", "worker-0", "--dry-run")
    assert rc == 1 and "openmpi backend does not support worker include/exclusion" in plan["problems"][0]
    # a filter that leaves one host takes DeepSpeed's local path, whatever the launcher
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "openmpi", "--include", "worker-0", "--dry-run")
    assert plan["head"] is None and "deepspeed.launcher.launch" in plan["nodes"][0]["shell"]


def test_torchrun_commands(tmp_path, capsys):
    hf = two_node_hostfile(tmp_path)
    rc, plan = check_json(capsys, "-H", str(hf), "--launcher", "torchrun", "--include", "worker-0@worker-1:1,3",
                          "--master_addr", "worker-0", "--master_port", "29600", "--dry-run")
    assert rc == 0, plan["problems"]
    n0, n1 = (shlex.split(n["shell"]) for n in plan["nodes"])
    assert n0 == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--node_rank=0", "--master_addr=worker-0",
                  "--master_port=29600", "-m", "cratelm", "train"]
    assert n1[:4] == ["CUDA_VISIBLE_DEVICES=1,3", "torchrun", "--nnodes=2", "--nproc_per_node=2"]
    assert "--node_rank=1" in n1
    # without a hostfile: --num_nodes x --num_gpus; c10d rendezvous has no node ranks
    rc, plan = check_json(capsys, "--launcher", "torchrun", "--num_nodes", "3", "--num_gpus", "8",
                          "--rdzv-backend", "c10d", "--rdzv-id", "job7", "--master_addr", "head", "--dry-run")
    assert rc == 0 and plan["world_size"] == 24
    words = shlex.split(plan["nodes"][2]["shell"])
    assert "--rdzv_endpoint=head:29500" in words and "--rdzv_id=job7" in words
    assert not any(w.startswith("--node_rank") for w in words)
    rc, out = check(capsys, "--launcher", "torchrun", "--num_nodes", "2", "--num_gpus", "1", "--node_rank", "2",
                    "--dry-run")
    assert rc == 1 and "--node_rank 2 is not below the number of nodes, 2" in out


# ----------------------------------------------------------------------------- batch

@pytest.mark.parametrize("overrides, says", [
    (["train.micro_batch=4", "train.global_batch=20"],
     "train.global_batch=20 is not divisible by train.micro_batch=4 x data-parallel size 8 (= 32; world size 8"),
    (["model.n_layer=3", "train.pipeline_stages=3", "train.zero_stage=1"], "world size 8 is not divisible by train.pipeline_stages=3"),
])
def test_batch_that_does_not_divide_is_refused(tmp_path, capsys, overrides, says):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    rc, out = check(capsys, "-H", str(hf), "--dry-run", "--config", TINY, *overrides)
    assert rc == 1 and f"job: {says}" in out, out
    # the same config passes on a world size that divides it
    rc, out = check(capsys, "-H", str(hf), "--num_gpus", "1", "--dry-run", "--config", TINY,
                    "train.micro_batch=4", "train.global_batch=24")
    assert rc == 0, out


# ----------------------------------------------------------------------------- probes

def test_port_in_use_on_this_host(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "already in use on this host" in probe_master("127.0.0.1", port)
        assert probe_master("127.0.0.1", port, role="worker") is None   # node 0 of the same job
        hf = tmp_path / "hostfile"
        hf.write_text("localhost slots=2\n")
        # every problem is listed: the port and the batch
        rc, out = check(capsys, "-H", str(hf), "--master_port", str(port), "--config", TINY,
                        "train.micro_batch=2", "train.global_batch=6")
        assert rc == 1 and "2 problem(s)" in out
        assert f"master port {port} is already in use" in out and "train.global_batch=6" in out
        rc, out = check(capsys, "-H", str(hf), "--master_port", str(port), "--dry-run")   # no probe
        assert rc == 0, out
    assert probe_master("127.0.0.1", free_port()) is None


def test_remote_master_answers_is_busy_or_is_silent(monkeypatch):
    """A remote master is probed by connecting: refused = up and free, accepted = taken,
    silence = unreachable. 127.0.0.1 plays the remote host here (locality patched out)."""
    import cratelm.launch_probes as lp

    assert "does not resolve" in probe_master("no-such-host.invalid", 29500)
    monkeypatch.setattr(lp, "is_local_address", lambda family, ip: False)
    assert "not an address of this host" in probe_master("127.0.0.1", free_port(), role="master")
    assert probe_master("127.0.0.1", free_port()) is None                        # refused: fine
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        assert "already in use on 127.0.0.1" in probe_master("127.0.0.1", port)
        srv.accept()[0].close()                                                  # empty the accept queue
        assert probe_master("127.0.0.1", port, role="worker") is None           # node 0 got there first
        srv.accept()[0].close()
        # the accept queue (backlog 0) is now full: further SYNs are dropped, as by a firewall
        with socket.socket() as filler:
            filler.connect(("127.0.0.1", port))
            msg = probe_master("127.0.0.1", port, timeout=0.3)
    assert msg and "unreachable from this host: no answer in 0.3 s" in msg


def test_deepspeed_env_lines_deepspeed_would_crash_on(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # DeepSpeed reads ./.deepspeed_env (and ~/.deepspeed_env)
    (tmp_path / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\n\n# NCCL_DEBUG=INFO\n")
    hf = two_node_hostfile(tmp_path)
    rc, plan = check_json(capsys, "-H", str(hf), "--master_addr", "worker-0", "--dry-run")
    assert rc == 1
    assert any(p.startswith("./.deepspeed_env:2: ") and "has no '='" in p for p in plan["problems"])
    assert any(p.startswith("./.deepspeed_env:3: ") for p in plan["problems"])
    assert "export NCCL_SOCKET_IFNAME=eth0;" in plan["nodes"][0]["shell"]


# ----------------------------------------------------------------------------- train's checks, the master

@pytest.mark.parametrize("overrides, says", [
    (["optim.warmup_steps=50", "optim.decay_steps=10"],
     "job: optim.decay_steps=10 (None = train.max_steps) is shorter than optim.warmup_steps=50"),
    (["train.pipeline_stages=2", "train.offload_optimizer=true", "train.zero_stage=1"],
     "job: train.offload_optimizer=true is not supported with train.pipeline_stages > 1"),
    (["train.pipeline_partition=columns"], "job: train.pipeline_partition='columns': choose parameters"),
])
def test_configs_that_train_rejects_fail_launch_check(tmp_path, capsys, overrides, says):
    """The same checks as `cratelm train` (cratelm.train.ds_config.check_job), not a copy of them."""
    from cratelm.config import ConfigError, load_config
    from cratelm.train.ds_config import check_job

    with pytest.raises(ConfigError) as e:
        check_job(load_config([TINY], ["train.micro_batch=1", "train.global_batch=4", *overrides]), 4, "cpu")
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "worker-0", "--dry-run", "--config", TINY,
                    "train.micro_batch=1", "train.global_batch=4", *overrides)
    assert rc == 1 and says in out and f"job: {e.value}" in out, out


def test_fp16_on_a_cpu_login_node_says_which_device_was_assumed(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=1\n")
    rc, out = check(capsys, "-H", str(hf), "--dry-run", "--config", TINY, "train.precision=fp16")
    assert rc == 1 and "not supported on CPU" in out and "pass --device cuda" in out
    rc, out = check(capsys, "-H", str(hf), "--dry-run", "--device", "cuda", "--config", TINY, "train.precision=fp16")
    assert rc == 0, out


def test_master_addr_must_be_node_0(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=1\n127.0.0.2 slots=1\nworker-9 slots=1\n")
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "127.0.0.2", "--dry-run", "--num_nodes", "2")
    assert rc == 1 and "--master_addr 127.0.0.2 is 127.0.0.2, node 1 of the selection, not node 0 (localhost)" in out
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "127.0.0.9", "--dry-run", "--num_nodes", "2")
    assert rc == 1 and "--master_addr 127.0.0.9 is not among the selected hosts (localhost, 127.0.0.2)" in out
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "127.0.0.1", "--dry-run", "--num_nodes", "2")
    assert rc == 0, out                                 # localhost's address
    # worker-9 does not resolve here: cannot be told, a warning only
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "10.1.2.3", "--dry-run", "--exclude", "127.0.0.2")
    assert rc == 0 and "could not tell from here whether it is node 0 (localhost)" in out, out
    rc, out = check(capsys, "-H", str(hf), "--master_addr", "worker-9", "--dry-run", "--launcher", "torchrun")
    assert rc == 1 and "--master_addr worker-9 is worker-9, node 2 of the selection" in out


def test_launch_check_from_python_with_typed_arguments(tmp_path):
    from cratelm.launch_check import LaunchSpec, check_launch

    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    plan = check_launch(LaunchSpec(hostfile=str(hf), master_addr="node-a", dry_run=True, config=[TINY],
                                   overrides=["train.micro_batch=1", "train.global_batch=8", f"train.run_dir={tmp_path}/r"],
                                   enable_each_rank_log=str(tmp_path / "logs"), launcher_args="--flag"))
    assert plan.problems == [] and plan.world_size == 4 and plan.run_dir == f"{tmp_path}/r"
    assert plan.batch.startswith("global 8 = micro 1 x grad accum 2 x data-parallel 4")
    assert plan.head.startswith("pdsh -S -f 1024 -w node-a,node-b --flag ")
    assert f"--enable_each_rank_log={tmp_path}/logs" in plan.nodes[1].shell
