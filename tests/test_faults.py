"""Fault injection: stopped, killed and interrupted processes, damaged checkpoints, a code-
running checkpoint, a full disk, diverging runs, bad paths, and what listens where. Each case
asserts the exit code, a message naming the right stage, no process left behind, valid metrics
and, where it applies, an exact resume. They are left out of the default run (setup.cfg), which
CI keeps under 10 minutes on 2 cores: `pytest -m faults` runs all of them, the long ones are
also marked slow."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, metric_rows, run_cli, synthetic_job, write_job

pytestmark = pytest.mark.faults
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def records(out: Path) -> list[dict[str, Any]]:
    return metric_rows(out)


def long_job(**run: Any) -> dict:
    job = synthetic_job(run={"iterations": 3000, "eval_every": 0, "rpc_timeout": 6,
                             "checkpoint_every": 2, **run})
    job["data"]["synthetic"]["train_size"] = 64
    return job


def job_processes(marker: str) -> list[int]:
    """The pids of sm-dist processes whose command line names `marker` (the run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "sm_dist" in cmdline and marker in cmdline:
            found.append(int(entry.name))
    return found


def pid_of_rank(rank: int, marker: str) -> int:
    for pid in job_processes(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"rank {rank} of {marker} not found")


def start(tmp_path: Path, job: dict, out: str, *extra: str) -> subprocess.Popen:
    path = write_job(tmp_path / f"{out}.yaml", job)
    return subprocess.Popen([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--out", str(tmp_path / out), *extra], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_iterations(proc: subprocess.Popen, out: Path, count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the run did not get going")


def assert_nothing_left(marker: str) -> None:
    deadline = time.time() + 15
    while job_processes(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not job_processes(marker), "stage processes were left behind"


def assert_metrics_whole(out: Path) -> list[dict[str, Any]]:
    kept = records(out)  # every line is whole JSON
    assert [r["iteration"] for r in kept] == list(range(1, len(kept) + 1))
    return kept


# ------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("rank", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_a_stopped_process_is_named_within_the_timeout(tmp_path: Path, rank: int) -> None:
    """SIGSTOP: a stage (its neighbours wait for it) or the coordinator (the stages stop
    hearing from it). Either way the job ends, names the stopped one and leaves no process."""
    out = tmp_path / f"stop{rank}"
    proc = start(tmp_path, long_job(), out.name)
    try:
        wait_for_iterations(proc, out, 3)
        victim = pid_of_rank(rank, out.name)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert time.time() - stopped_at < 8 * 6  # a few rpc_timeouts at most, never a hang
    assert f"stage {rank} (rank {rank}" in stderr.splitlines()[0 if rank else -1] or \
        f"stage {rank} (rank {rank}" in stderr, stderr
    assert "stopped" in stderr
    assert_nothing_left(out.name)
    assert_metrics_whole(out)


@pytest.mark.parametrize("how", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_an_interrupted_launcher_says_one_line_and_keeps_its_checkpoints(
        tmp_path: Path, how: str) -> None:
    out = tmp_path / f"int-{how}"
    proc = start(tmp_path, long_job(), out.name)
    try:
        wait_for_iterations(proc, out, 5)
        proc.send_signal(getattr(signal, how))
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"sm-dist: stopped by {how}; the run directory keeps every finished "
                     "iteration and checkpoint"], stderr
    assert_nothing_left(out.name)
    kept = assert_metrics_whole(out)
    assert len(kept) >= 5 and list((out / "checkpoints").glob("step-*/manifest.json"))
    note = json.loads((out / "stopped.json").read_text())  # the launcher's signal, not rank 0's
    assert note["kind"] == "interrupted" and note["message"] == f"stopped by {how}"
    assert note["checkpoint"] and json.loads((out / "trace.json").read_text())
    report = run_cli("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert f"{out.name} ended early: stopped by {how}; the newest complete checkpoint is " \
        in " ".join(report.stdout.split())


@pytest.mark.slow
def test_ctrl_c_under_torchrun_says_one_line_and_keeps_its_checkpoints(tmp_path: Path) -> None:
    """Ctrl-C reaches launch/single_node.sh's whole process group (torchrun's agent and every
    rank): one line, exit 1, the checkpoints kept, nothing left running."""
    out = tmp_path / "torchrun-int"
    path = write_job(tmp_path / "job.yaml", long_job())
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "single_node.sh"), str(path),
                             "--no-live", "--out", str(out)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_iterations(proc, out, 5)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    lines = [line for line in stderr.splitlines() if not line.startswith("launch: /")]
    assert lines == ["launch: stopped by SIGINT; the run directory keeps every finished "
                     "iteration and checkpoint"], stderr
    assert_nothing_left(out.name)
    assert len(assert_metrics_whole(out)) >= 5
    assert list((out / "checkpoints").glob("step-*/coordinator.pt"))


def test_a_killed_replica_says_one_line(tmp_path: Path) -> None:
    """2 stages x 2 replicas, one replica killed: exactly one line on stderr, naming it, the
    noise of its neighbours (TensorPipe's `[rankN]:[W...]` lines) and their reports of it kept
    in the run's stderr.log, its stop note naming the cause."""
    job = long_job()
    job["model"] = {**job["model"], "balance": [2, 1], "replicas": 2}
    out = tmp_path / "killed-replica"  # what finds its processes: no other command line has it
    proc = start(tmp_path, job, out.name)
    try:
        wait_for_iterations(proc, out, 3)
        victim = pid_of_rank(3, out.name)
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"sm-dist: error: stage 1 replica 1 (rank 3, pid {victim}) was killed by "
                     "SIGKILL"], stderr
    assert_nothing_left(out.name)
    assert_metrics_whole(out)
    # What the others said as their neighbour died: TensorPipe's warnings, their own reports
    # of it when they saw it before the launcher stopped them.
    log = (out / "stderr.log").read_text()
    assert re.search(r"^rank \d: (\[rank\d\]:\[W.*tensorpipe|sm-dist: error: stage 1 replica 1)",
                     log, re.M | re.I), log
    note = json.loads((out / "stopped.json").read_text())
    assert note["kind"] == "failed" and "was killed by SIGKILL" in note["message"]


def test_the_neighbours_dying_words_are_noise() -> None:
    """What a stage's C++ runtime prints as it is torn down after a neighbour's death goes to
    stderr.log only; an error report does not. (`terminate called recursively` reached the
    terminal in 2 of 7 killed-replica runs before it was listed.)"""
    from sm_dist.launch.processes import NOISE

    noise = ["terminate called without an active exception",
             "terminate called recursively",
             "[rank1]:[W1207 03:51:02.1 tensorpipe_agent.cpp:725] RPC agent is shutting down",
             "FATAL: exception not rethrown", "   "]
    said = ["sm-dist: error: stage 1 (rank 1) stopped answering",
            "terminate called after throwing an instance of 'c10::Error'"]
    assert all(NOISE.search(line) for line in noise)
    assert not any(NOISE.search(line) for line in said)


def test_a_killed_launcher_takes_its_stages_with_it(tmp_path: Path) -> None:
    out = tmp_path / "orphans"
    proc = start(tmp_path, long_job(), out.name)
    try:
        wait_for_iterations(proc, out, 3)
        proc.kill()  # SIGKILL: no handler of ours runs
        proc.wait()
    finally:
        proc.kill()
    assert_nothing_left(out.name)
    assert_metrics_whole(out)


# --------------------------------------------------------------------- checkpoints on disk
@pytest.fixture
def checkpointed(tmp_path: Path) -> tuple[Path, Path]:
    """A finished 6-iteration single-process run with checkpoints at 4 and 6."""
    job = synthetic_job(run={"iterations": 6, "checkpoint_every": 4, "keep_last": 0,
                             "eval_every": 0})
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), "--single-process", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return path, tmp_path / "run"


@pytest.mark.parametrize("damage", ["missing stage", "torn stage", "torn coordinator"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(
        tmp_path: Path, checkpointed: tuple[Path, Path], damage: str) -> None:
    path, run = checkpointed
    newest = run / "checkpoints" / "step-6"
    if damage == "missing stage":
        (newest / "stage-1.pt").unlink()
    elif damage == "torn stage":
        data = (newest / "stage-2.pt").read_bytes()
        (newest / "stage-2.pt").write_bytes(data[: len(data) // 2])
    else:
        (newest / "coordinator.pt").write_bytes(b"\x80\x02not a checkpoint")
    result = run_cli("train", str(path), "--single-process", "--no-live", "--resume", "run",
                     "--set", "run.iterations=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())  # the header wraps at the terminal's width
    assert "resumed after iteration 4 from" in said
    warnings = result.stderr.splitlines()  # the note goes to stderr, one line
    assert len(warnings) == 1 and warnings[0].startswith(
        "sm-dist: warning: passed over checkpoints/step-6: "), result.stderr
    assert warnings[0].endswith("; resuming from step-4")
    assert ("stage-1.pt" if damage == "missing stage" else
            "stage-2.pt" if damage == "torn stage" else "coordinator.pt") in warnings[0]
    assert [r["iteration"] for r in records(run)] == list(range(1, 9))


def test_loading_a_checkpoint_runs_no_code(tmp_path: Path,
                                           checkpointed: tuple[Path, Path]) -> None:
    """A coordinator.pt whose unpickling would touch a file: refused, nothing touched."""
    path, run = checkpointed
    flag = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {flag}",))

    newest = run / "checkpoints" / "step-6"
    torch.save({"point": Exploit(), "num_stages": 3}, newest / "coordinator.pt")
    # Whoever can write the file can write its manifest: loading must be safe without it.
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "coordinator.pt").read_bytes()
    manifest["files"]["coordinator.pt"] = {"size": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("train", str(path), "--single-process", "--no-live", "--resume", "run",
                     "--set", "run.iterations=8", cwd=tmp_path)
    assert not flag.exists()
    assert result.returncode == 0, result.stderr  # it falls back to step-4
    assert "passed over checkpoints/step-6: coordinator.pt is not loadable" in result.stderr


def test_resume_may_change_what_does_not_alter_the_numbers(
        tmp_path: Path, checkpointed: tuple[Path, Path]) -> None:
    path, run = checkpointed
    result = run_cli("train", str(path), "--single-process", "--no-live", "--resume", "run",
                     "--set", "run.iterations=8", "--set", "run.rpc_timeout=900",
                     "--set", "run.eval_every=3", "--set", "run.threads=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    refused = run_cli("train", str(path), "--single-process", "--resume", "run",
                      "--set", "run.iterations=9", "--set", "run.seed=4", cwd=tmp_path)
    assert refused.returncode == 2 and "run.seed" in refused.stderr


# ------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 1e30}, {"name": "adam", "lr": 1e6},
                                       {"name": "gd", "lr": 1e8}])
def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(
        tmp_path: Path, optimizer: dict) -> None:
    job = synthetic_job(optimizer=optimizer, run={"iterations": 30, "checkpoint_every": 1,
                                                  "eval_every": 0})
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), "--single-process", "--no-live", "--out", "run",
                     cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the optimizer diverged, so the run stopped" in result.stderr
    run = tmp_path / "run"
    stopped_at = records(run)[-1]["iteration"]
    assert stopped_at < 30 and not (run / "model.pt").exists()
    for step in (run / "checkpoints").glob("step-*"):
        for name in step.glob("stage-*.pt"):
            state = torch.load(name, weights_only=True)["module"]
            assert all(torch.isfinite(t).all() for t in state.values()), name
    assert json.loads((run / "summary.json").read_text())["stopped"]
    note = json.loads((run / "stopped.json").read_text())
    assert note["kind"] == "diverged" and note["iteration"] == stopped_at
    # One update is enough here: the checkpoint after iteration 1 already holds weights whose
    # loss (iteration 2's) is past the bound, so none is offered, and resuming is refused.
    assert note["checkpoint"] is None
    assert "no checkpoint within the stopping rule's bound" in (run / "stopped.txt").read_text()
    again = run_cli("train", str(path), "--single-process", "--no-live", "--resume", "run",
                    "--set", "run.iterations=40", cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    assert "has no checkpoint to continue from" in again.stderr
    assert "it holds the weights of a diverging run" in again.stderr


def test_a_diverging_run_names_the_last_checkpoint_within_the_bound(tmp_path: Path) -> None:
    """GD with too large a step on a quadratic loss grows the loss geometrically: the newest
    checkpoint holds weights whose loss is past the bound already (its iteration's loss was
    measured before its update); the note names the one before, with its iteration and the
    loss at its weights, and --resume starts there, at a loss within the bound."""
    job = synthetic_job(optimizer={"name": "gd", "lr": 5.0}, loss="mse",
                        model={"mlp": {"widths": [6, 5, 4, 3], "activation": "relu"},
                               "balance": [1, 1, 1]},
                        run={"iterations": 30, "checkpoint_every": 1, "eval_every": 0})
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), "--single-process", "--no-live", "--out", "run",
                     cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    run = tmp_path / "run"
    losses = {r["iteration"]: r["train_loss"] for r in records(run)}
    stopped_at = max(losses)
    assert losses[stopped_at] > 1e4 * losses[1] and stopped_at > 3
    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert kept == [stopped_at - 2, stopped_at - 1]  # keep_last 2
    note = json.loads((run / "stopped.json").read_text())
    assert note["checkpoint_iteration"] == stopped_at - 2
    assert note["checkpoint_loss"] == losses[stopped_at - 1]  # measured at its weights
    assert losses[stopped_at - 1] < 1e4 * losses[1]
    text = (run / "stopped.txt").read_text()
    assert f"step-{stopped_at - 2} (after iteration {stopped_at - 2}, training loss " in text
    resumed = run_cli("train", str(path), "--single-process", "--no-live", "--resume", "run",
                      cwd=tmp_path)
    assert f"passed over checkpoints/step-{stopped_at - 1}: it holds the weights of a " \
           "diverging run" in resumed.stderr
    again = {r["iteration"]: r["train_loss"] for r in records(run)}
    assert again[stopped_at - 1] == losses[stopped_at - 1]  # the first resumed iteration


def test_sm_never_applies_a_step_it_predicts_raises_the_loss() -> None:
    """A stage whose local model's value at its step is positive keeps its parameters, so a
    step size that sends other optimizers to infinity (inner_lr 1e6) leaves SM's loss finite."""
    from sm_dist.config.build import build_local_pipeline, load_job_data
    from sm_dist.config.job import job_from_dict
    from sm_dist.run.trainer import train

    job = job_from_dict(synthetic_job(optimizer={"name": "sm", "inner_solver": "gradient",
                                                 "inner_lr": 1e6, "inner_steps": 2},
                                      run={"iterations": 2, "eval_every": 0,
                                           "on_nonfinite": "skip"}))
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    before = [p.detach().clone() for stage in pipeline.stages for p in stage.params]
    rs = train(job, pipeline, load_job_data(job), lambda r: None)
    assert all(v is None or v <= 0 for r in rs for v in r.metric("local_loss"))
    stopped = [s for r in rs for s in r.metric("inner_stopped")]
    assert "predicted increase: step not applied" in stopped
    after = [p.detach() for stage in pipeline.stages for p in stage.params]
    assert any(torch.equal(a, b) for a, b in zip(before, after))
    assert all(math.isfinite(r.train_loss) for r in rs)


# ------------------------------------------------------------------------------ file system
def test_a_full_disk_ends_the_run_with_one_message(tmp_path: Path) -> None:
    """Writes beyond a small file-size limit fail (as on a full disk): exit 1, one line, the
    metrics written before kept whole."""
    job = synthetic_job(run={"iterations": 400, "eval_every": 0})
    path = write_job(tmp_path / "job.yaml", job)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    result = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path),
                             "--single-process", "--no-live", "--out", "run"], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, preexec_fn=limit,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sm-dist")]
    assert len(errors) == 1 and "cannot write the run directory" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert metrics.endswith("\n") or metrics == ""
    assert_metrics_whole(tmp_path / "run")


# A disk that fills: a small tmpfs where this process may mount one (root), else writes that
# fail with ENOSPC under the run directory, injected at Python's open() by
# tests/full_disk/sitecustomize.py (also os.statvfs, for a disk full before the start).
FULL_DISK = Path(__file__).parent / "full_disk"
DISK_SIZE = 8 * 1024 * 1024


class SmallDisk:
    """Where a run's directory goes, and how to fill and free that place."""

    def __init__(self, tmp_path: Path, how: str) -> None:
        self.how, self.root = how, tmp_path / "disk"
        self.root.mkdir()
        self.flag = tmp_path / "disk-is-full.json"
        self.env = dict(ENV)
        if how == "tmpfs":
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}",
                                      "tmpfs", str(self.root)], capture_output=True)
            if mounted.returncode != 0:
                pytest.skip("cannot mount a tmpfs here (not root): the injected case runs")
        else:
            self.env.update({"PYTHONPATH": f"{FULL_DISK}{os.pathsep}{REPO}",
                             "SM_DIST_TEST_FULL_DISK": str(self.flag),
                             "SM_DIST_TEST_FULL_DIR": str(self.root)})

    def fill(self, room: int) -> None:
        """Leave about `room` bytes free."""
        if self.how == "injected":
            self.flag.write_text(json.dumps({"room": room, "statvfs": room == 0}))
            return
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        with open(self.root / "filler", "wb") as handle:
            try:
                handle.write(b"\0" * max(free - room, 0))
                handle.flush()
            except OSError:
                pass  # full: as wanted

    def free(self) -> None:
        if self.how == "injected":
            self.flag.unlink(missing_ok=True)
        else:
            (self.root / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        if self.how == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path, request.param)
    try:
        yield disk
    finally:
        disk.close()


def wide_job(**run: Any) -> dict:
    """Two stages of about 330 KB of parameters: checkpoints of about 400 KB (SM)."""
    job = synthetic_job(model={"mlp": {"widths": [100, 200, 100, 10], "activation": "tanh"},
                               "balance": [2, 1]},
                        run={"iterations": 2000, "eval_every": 0, "checkpoint_every": 5,
                             "keep_last": 1, "rpc_timeout": 30, **run})
    job["data"] = {**job["data"], "synthetic": {"features": 100, "classes": 10,
                                                "train_size": 64, "test_size": 12}}
    return job


def assert_every_file_whole(run: Path) -> list[dict[str, Any]]:
    """Every metrics and plans line parses, every JSON file parses (json.loads itself: a
    trace is whole too), no temporary file is left, every checkpoint is complete."""
    kept = assert_metrics_whole(run)
    for line in (run / "plans.jsonl").read_text().splitlines():
        json.loads(line)
    for name in run.rglob("*.json"):
        json.loads(name.read_text())
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    for step in (run / "checkpoints").glob("step-*"):
        assert (step / "manifest.json").is_file(), f"{step} is incomplete"
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("room", [0, 300_000], ids=["no-room", "room-for-part-of-a-checkpoint"])
def test_a_disk_that_fills_during_a_run_leaves_every_file_whole(
        tmp_path: Path, small_disk: SmallDisk, room: int) -> None:
    """The disk fills while the engine trains (another program takes the space): one line on
    stderr, exit 1, every file whole or absent, and, once there is space, the last complete
    checkpoint resumes to the numbers of a run that never stopped."""
    path = write_job(tmp_path / "job.yaml", wide_job())
    out = small_disk.root / "filled-disk-run"  # a name no other process's command line has
    proc = subprocess.Popen([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--out", str(out)], cwd=tmp_path, env=small_disk.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iterations(proc, out, 12)
        small_disk.fill(room)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1, stderr
    said = re.fullmatch(rf"sm-dist: error: cannot write the run directory {out}: No space "
                        r"left on device \(writing (\S+)\); it keeps iterations 1-\d+ in "
                        r"metrics.jsonl and the checkpoint after iteration \d+ \(\S+\), every "
                        rf"file whole; free space, then --resume {out}", errors[0])
    assert said is not None, errors[0]
    if room:  # no room for the next checkpoint: its write failed, and nothing of it is left
        assert said.group(1).startswith("checkpoints/step-"), errors[0]
    assert_nothing_left(out.name)
    kept = assert_every_file_whole(out)
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    # A record is written once the next iteration's result is in, so the newest checkpoint
    # may be one iteration ahead of metrics.jsonl (the fill came between them); its own copy
    # of that record goes back into metrics.jsonl on resume (RunDirectory), checked below.
    assert steps and steps[-1] <= len(kept) + 1
    small_disk.free()
    report = run_cli("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "ended early: " in report.stdout
    total = steps[-1] + 6
    resumed = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                              "--resume", str(out), "--set", f"run.iterations={total}"],
                             cwd=tmp_path, env=small_disk.env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli("train", str(path), "--no-live", "--out", "straight",
                       "--set", f"run.iterations={total}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    a, b = records(tmp_path / "straight"), assert_every_file_whole(out)
    assert [r["iteration"] for r in b] == list(range(1, total + 1))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9), ra["iteration"]


def test_a_disk_full_before_the_start_is_bad_input_and_leaves_nothing(
        tmp_path: Path, small_disk: SmallDisk) -> None:
    """No process starts: exit 2 with the numbers, nothing written; once space is freed the
    same --out trains."""
    path = write_job(tmp_path / "job.yaml", wide_job(iterations=3))
    out = small_disk.root / "run"
    small_disk.fill(0)
    result = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--out", str(out)], cwd=tmp_path, env=small_disk.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert " free on its file system " in result.stderr
    assert "the run needs about " in result.stderr and "free space" in result.stderr
    assert "starting" not in result.stdout  # no stage process was started
    assert not out.exists()
    small_disk.free()
    again = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                            "--out", str(out)], cwd=tmp_path, env=small_disk.env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(assert_every_file_whole(out)) == 3


def test_a_disk_that_fills_before_the_first_iteration_leaves_nothing(tmp_path: Path) -> None:
    """The check passed, then writing the run directory failed at once: exit 1, nothing left
    behind (no empty config.yaml that refuses the same --out), and the same --out trains."""
    disk = SmallDisk(tmp_path, "injected")
    path = write_job(tmp_path / "job.yaml", wide_job(iterations=3))
    out = disk.root / "run"
    disk.flag.write_text(json.dumps({"room": 100, "statvfs": False}))
    result = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--single-process", "--out", str(out)], cwd=tmp_path,
                            env=disk.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"sm-dist: error: cannot write the run directory {out}: No space left on device "
        "(writing config.yaml); it finished no iteration and left nothing behind"]
    assert not out.exists()
    disk.free()
    again = run_cli("train", str(path), "--single-process", "--no-live", "--out", str(out),
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("where", ["out", "root", "factory"])
def test_bad_paths_and_factories_are_bad_input_before_any_process(
        tmp_path: Path, where: str) -> None:
    job = synthetic_job()
    args = ["--out", "run"]
    if where == "out":
        args = ["--out", str(tmp_path / "job.yaml" / "run")]  # under a file
    elif where == "root":
        job["data"] = {"dataset": "fashion_mnist", "root": "/proc/no-such-root"}
        job["model"] = {"mlp": {"widths": [784, 10]}, "balance": [1]}
    else:
        (tmp_path / "badfactory.py").write_text("def build():\n    raise KeyError('widths')\n")
        job["model"] = {"factory": "badfactory:build", "balance": [1]}
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("sm-dist: error: "), result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ listening
def test_a_default_run_listens_on_loopback_only(tmp_path: Path) -> None:
    """Every listening TCP socket of the launcher and its stage processes, read from
    /proc/net/tcp and tcp6 through the processes' file descriptors, is on 127.0.0.0/8."""
    out = tmp_path / "listen"
    proc = start(tmp_path, long_job(), out.name)
    try:
        wait_for_iterations(proc, out, 3)
        pids = [proc.pid, *job_processes(out.name)]
        inodes = set()
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        listening = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                    listening.append((table, fields[1].split(":")[0]))
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert listening, "found no listening socket: the probe is broken"
    for table, address in listening:
        if table == "tcp":
            assert address.endswith("7F"), f"listens on {address} (not 127.x)"
        else:
            loopback6 = ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
            assert address in loopback6, address


# ------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_torchrun_restarts_resume_a_killed_run_exactly(tmp_path: Path) -> None:
    """torchrun --max-restarts 2; a stage is killed mid-run; the restarted attempt resumes
    from the newest checkpoint; the finished metrics equal an uninterrupted run's, every
    iteration once."""
    job = synthetic_job(run={"iterations": 40, "checkpoint_every": 1, "eval_every": 0,
                             "rpc_timeout": 30})
    job["data"]["synthetic"]["train_size"] = 256
    path = write_job(tmp_path / "job.yaml", job)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "3", "--max-restarts", "2", "-m", "sm_dist",
                             "train", str(path), "--no-live", "--out", "restarted"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = tmp_path / "restarted"
    try:
        wait_for_iterations(proc, out, 12)
        os.kill(pid_of_rank(1, "restarted"), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    straight = run_cli("train", str(path), "--single-process", "--out", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    a, b = records(tmp_path / "straight"), records(out)
    assert [r["iteration"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
    assert list(out.glob("metrics.jsonl.before-resume-*"))
