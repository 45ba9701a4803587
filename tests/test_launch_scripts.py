"""The launch scripts (launch/single_node.sh, multi_node.sh, slurm.sbatch), run for real."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import metric_rows

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "common.sh"]
TIMEOUT = 120  # seconds any one launch may take before it is killed and the test fails

# What a launch reads from the environment: cleared so that the caller's shell cannot leak in.
LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID",
               "RDZV_BACKEND", "TORCHRUN", "SM_DIST_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "BIND")


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def two_stage_job(path: Path) -> Path:
    job = {
        "name": "launch-tiny",
        "model": {"mlp": {"widths": [6, 5, 3], "activation": "tanh"}, "balance": [1, 1]},
        "data": {"dataset": "synthetic", "microbatches": 2,
                 "synthetic": {"features": 6, "classes": 3, "train_size": 24, "test_size": 12}},
        "optimizer": {"name": "sm", "inner_steps": 2},
        "run": {"iterations": 2, "threads": 1, "rpc_timeout": 60},
    }
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen[str]) -> None:
    """End a launch this test started, and every process it started, if still running."""
    if proc.poll() is not None:
        return
    tree = _descendants(proc.pid)
    proc.terminate()  # torchrun stops its workers on SIGTERM
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    """Wait for every launch (TIMEOUT in all); (returncode, stdout, stderr) of each."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            stop(proc)
    return results


def run_script(script: str, *args: str, env: dict[str, str], cwd: Path = REPO,
               ) -> tuple[int, str, str]:
    return finish([start(["bash", str(LAUNCH / script), *args], env, cwd)])[0]


def launch_lines(stderr: str) -> list[str]:
    """The torchrun command lines a launch printed (`launch: ... -m sm_dist train ...`)."""
    return [line for line in stderr.splitlines()
            if line.startswith("launch: ") and " -m sm_dist train " in line]


def metrics(run_dir: Path) -> list[dict]:
    return metric_rows(run_dir)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_help_and_missing_job(script: str) -> None:
    code, out, err = run_script(script, "--help", env=launch_env())
    assert code == 0, err
    assert f"launch/{script}" in out and "Usage:" in out and "JOB.yaml" in out
    assert "#!" not in out and "set -euo" not in out  # the comment block only
    code, out, err = run_script(script, env=launch_env())
    assert code == 2 and "missing JOB.yaml" in err and "Usage:" in err


def test_single_node_trains(tmp_path: Path) -> None:
    job = two_stage_job(tmp_path / "job.yaml")
    run_dir = tmp_path / "run dir"  # a space: the arguments must reach sm-dist unchanged
    code, out, err = run_script("single_node.sh", str(job), "--out", str(run_dir), "--no-live",
                                env=launch_env(), cwd=tmp_path)
    assert code == 0, out + err
    [line] = launch_lines(err)
    assert "--standalone --nnodes 1 --nproc-per-node 2 -m sm_dist train" in line
    # The printed line is the command itself, quoted for the shell.
    assert shlex.split(line)[-6:] == ["sm_dist", "train", str(job), "--out", str(run_dir),
                                      "--no-live"]
    assert len(metrics(run_dir)) == 2
    assert "results in" in out


def test_single_node_refuses_a_world_size_other_than_the_stages(tmp_path: Path) -> None:
    job = two_stage_job(tmp_path / "job.yaml")
    code, out, err = run_script("single_node.sh", str(job), env=launch_env(NPROC_PER_NODE="3"),
                                cwd=tmp_path)
    assert code == 2, out + err
    assert err.splitlines() == ["launch: error: NPROC_PER_NODE=3 does not match the job's 2 "
                                "stages (len(model.balance)); start exactly one process per "
                                "stage (leave NPROC_PER_NODE unset)"]


def test_bad_input_in_the_ranks_exits_2_in_one_line(tmp_path: Path) -> None:
    """An error only a rank can find (the data factory) under torchrun: its one line and exit
    code 2, not torchrun's traceback and exit code 1."""
    job = yaml.safe_load(two_stage_job(tmp_path / "job.yaml").read_text())
    job["data"] = {"factory": "nosuchmodule:data", "microbatches": 2}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out, err = run_script("single_node.sh", "job.yaml", "--no-live",
                                env=launch_env(), cwd=tmp_path)
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if not line.startswith("launch: ")]
    assert errors == ["sm-dist: error: cannot import data factory 'nosuchmodule:data': "
                      "ModuleNotFoundError: No module named 'nosuchmodule'; check that its "
                      "module is on the Python path"], err


def test_multi_node_names_a_missing_variable(tmp_path: Path) -> None:
    job = two_stage_job(tmp_path / "job.yaml")
    code, _, err = run_script("multi_node.sh", str(job),
                              env=launch_env(NODE_RANK="0", MASTER_ADDR="127.0.0.1"))
    assert code != 0 and "NNODES is not set" in err and not launch_lines(err)
    code, _, err = run_script("multi_node.sh", str(job),
                              env=launch_env(NNODES="2", NODE_RANK="0"))
    assert code != 0 and "MASTER_ADDR is not set" in err and not launch_lines(err)


def test_multi_node_refuses_a_world_size_other_than_the_stages(tmp_path: Path) -> None:
    job = two_stage_job(tmp_path / "job.yaml")
    env = launch_env(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", NPROC_PER_NODE="3")
    code, _, err = run_script("multi_node.sh", str(job), env=env)
    assert code == 2, err
    assert "1 * 3 = 3 does not match the job's 2 stages" in err
    assert not launch_lines(err)  # nothing was started


def test_two_nodes_train_together(tmp_path: Path) -> None:
    job = two_stage_job(tmp_path / "job.yaml")
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = [start(["bash", str(LAUNCH / "multi_node.sh"), str(job), "--out", str(run_dir),
                    "--no-live"],
                   launch_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=port, NPROC_PER_NODE="1", RDZV_ID="launch-test",
                              BIND="lo"),
                   tmp_path)
             for rank in (0, 1)]
    results = finish(nodes)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"node {rank}:\n{out}\n{err}"
        [line] = launch_lines(err)
        assert (f"--nnodes 2 --node-rank {rank} --nproc-per-node 1 --rdzv-backend c10d "
                f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id launch-test -m sm_dist train") in line
    # Whichever node's process became rank 0 coordinated and wrote the run directory.
    assert sum("results in" in out for _, out, _ in results) == 1
    assert len(metrics(run_dir)) == 2


def test_slurm_batch_starts_one_launcher_per_node(tmp_path: Path) -> None:
    """slurm.sbatch under stand-ins for scontrol, srun (two nodes, one after the other) and
    torchrun (records what it was given): real multi_node.sh, real job checks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "torchrun-calls.jsonl"
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2 $3" = "show hostnames node-[a-b]" ] || exit 9\n'
        "printf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nset -e\nprintf 'srun %s\\n' \"$*\" >&2\n"
        'while [[ $1 == --* ]]; do shift; done\n'
        'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@"; done\n')
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    env = {k: os.environ.get(k) for k in ('NNODES', 'NODE_RANK', 'MASTER_ADDR')}\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': env}) + '\\n')\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    job = two_stage_job(tmp_path / "job.yaml")
    env = launch_env(PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN=str(bin_dir / "torchrun"),
                     SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                     SLURM_SUBMIT_DIR=str(REPO), SLURM_NODEID="0")
    code, _, err = run_script("slurm.sbatch", str(job), "--set", "run.seed=3",
                              "--out", "runs/a b", env=env)
    assert code == 0, err
    assert "srun --kill-on-bad-exit=1 bash -c" in err
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [r["env"] for r in records] == [
        {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "node-a"} for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["argv"] == [
            "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:29500",
            "--rdzv-id", "sm-dist-4242", "-m", "sm_dist", "train", str(job),
            "--set", "run.seed=3", "--out", "runs/a b"]
