"""Starting a job's stage processes on this machine (`sm-dist train`): one child per stage,
their store on loopback, children that die with the launcher, one line per failure, named by
stage, rank and pid (the consequences in the other processes held back), one line for an
interruption, and the noise of dying peers filtered out of stderr and kept in the run's
stderr.log."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO

from sm_dist.engine.layout import Layout
from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME
from sm_dist.run.run_dir import STDERR_LOG
from sm_dist.run.session import record_cause
from sm_dist.whole_files import RecordFile

LAUNCHED = "SM_DIST_LAUNCHED"  # set in the children: the launcher reports for them
# Lines a process writes when a neighbour dies under it: TensorPipe's and gloo's warnings
# (which torch prefixes with `[rankN]:` when it knows the rank), C++'s last words. The failure
# itself is reported once, by stage and rank.
NOISE = re.compile(r"^(\[rank\d+\]:)?\[[WE] ?\d*.*(tensorpipe|TensorPipe|ProcessGroupGloo|"
                   r"socket\.cpp|"
                   r"thread_pool\.cpp:\d+\] Exception in thread pool task: unknown)|"
                   r"^terminate called (without an active exception|recursively)|"
                   r"^FATAL: exception not rethrown|"
                   r"^\s*$")
GRACE = 10.0  # seconds a child may take to finish after the others are done or stopped
# Signals sent from outside (a person, the OOM killer, a batch system). A process that dies by
# another one (SIGABRT, SIGSEGV) at the same moment is likely a consequence of such a death.
EXTERNAL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
ERROR = "sm-dist: error:"  # how a process begins its report of a failure


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux's parent-death signal),
    so that a killed launcher leaves no stage process training on."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the launcher's own handlers stop the children


def forward_without_noise(stream: IO[bytes], sink: IO[str]) -> None:
    """Copy `stream` to `sink` line by line, less the NOISE lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if not NOISE.search(line):
            sink.write(line)
            sink.flush()


class StderrGate:
    """The stage processes' stderr on its way to ours. Noise is dropped; a process's report of
    a failure (its `sm-dist: error:` line and everything after it) is held until the job has
    ended, when the launcher knows whether it is the cause or a consequence of another
    process's death (`release` or `drop`); everything else passes at once. Every line, noise
    included, is kept for the run's stderr.log."""

    def __init__(self, sink: IO[str]) -> None:
        self.sink = sink
        self.lock = threading.Lock()
        self.held: list[str] = []
        self.reported: set[int] = set()  # ranks that reported a failure themselves
        self.log: IO[str] | None = tempfile.TemporaryFile("w+", encoding="utf-8")

    def pump(self, rank: int, stream: IO[bytes]) -> None:
        """Pass `stream` (rank's stderr) through, line by line, until it ends."""
        holding = False
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            line += "" if line.endswith("\n") else "\n"
            with self.lock:
                self._keep(f"rank {rank}: {line}")
                if NOISE.search(line):
                    continue
                if line.startswith(ERROR):
                    holding = True
                    self.reported.add(rank)
                if holding:
                    self.held.append(line)
                else:
                    self.sink.write(line)
                    self.sink.flush()

    def _keep(self, line: str) -> None:
        if self.log is not None:
            try:
                self.log.write(line)
            except OSError:  # no room for the spool: the log is not worth a failure
                self.log = None

    def release(self) -> None:
        """Print the held reports: they say why the job failed."""
        with self.lock:
            self.sink.writelines(self.held)
            self.sink.flush()
            self.held.clear()

    def drop(self) -> None:
        """Forget the held reports (they stay in the log): the launcher says the cause."""
        with self.lock:
            self.held.clear()

    def save_log(self, path: Path) -> None:
        """Append every line kept to `path`, whole (a full disk keeps the file as it was)."""
        with self.lock:
            if self.log is None or not self.log.tell():
                return
            self.log.seek(0)
            try:
                log = RecordFile(path)
                try:
                    while block := self.log.read(1 << 20):
                        log.append(block)
                finally:
                    log.close()
            except OSError:
                pass  # the failure the job ended with says more than its log could


class LocalJob:
    """The stage processes of one job on this machine, and the store they meet at."""

    def __init__(self, num_ranks: int, args: Sequence[str], timeout: float) -> None:
        import torch.distributed as dist

        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))  # loopback only: nothing off this machine
        self.listener.listen(128)
        port = self.listener.getsockname()[1]
        self.store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                   master_listen_fd=self.listener.fileno(),
                                   timeout=timedelta(seconds=timeout))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(num_ranks), "LOCAL_WORLD_SIZE": str(num_ranks),
               "GROUP_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": str(uuid.uuid4()),
               "TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", LAUNCHED: "1"}
        self.gate = StderrGate(sys.stderr)
        self.children: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for rank in range(num_ranks):
            child = subprocess.Popen(
                [sys.executable, *args], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent)
            self.children.append(child)
            pump = threading.Thread(target=self.gate.pump, args=(rank, child.stderr),
                                    daemon=True)
            pump.start()
            self.pumps.append(pump)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(sig)
                child.send_signal(signal.SIGCONT)  # a stopped child acts on it at once

    def reap(self, grace: float = GRACE) -> None:
        """Wait up to `grace` for every child, then kill what is left."""
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for pump in self.pumps:
            pump.join(1.0)
        self.listener.close()


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, a debugger): it then answers nothing."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_local(layout: Layout, args: Sequence[str], timeout: float,
                 run_dir: Path | None = None) -> int:
    """Run `python ARGS` as every rank of a job of `layout` (stages x replicas processes) on
    this machine; the job's exit code: 0, 2 when every failed rank exited 2 (bad input), else
    1. Ranks are named by stage (and replica) in what it says: one line per failure. Every
    line the processes wrote on stderr goes to `run_dir`/stderr.log when the run is there."""
    job = LocalJob(layout.world_size, args, timeout)
    interrupted: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        job.stop(signal.SIGTERM)  # rank 0 saves what is finished, then leaves

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed, stopped = _watch(job, interrupted)
        job.reap()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code, cause = _report(layout, job, failed, stopped, interrupted)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        job.gate.save_log(run_dir / STDERR_LOG)
        if interrupted:  # rank 0 saw the SIGTERM the launcher sent, not what the launcher got
            record_cause(run_dir, f"stopped by {signal.Signals(interrupted[0]).name}",
                         "interrupted")
        elif cause is not None:  # rank 0 could not know it
            record_cause(run_dir, cause)
    return code


def _watch(job: LocalJob, interrupted: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Wait until the job ends, a rank fails or a signal came; the failed ranks with their
    codes and the stopped ranks, found before the launcher stops the others."""
    def failures() -> list[tuple[int, int]]:
        return [(rank, code) for rank, child in enumerate(job.children)
                if (code := child.poll()) not in (None, EXIT_OK)]

    while True:
        codes = [child.poll() for child in job.children]
        if (failures() or interrupted or codes[0] == EXIT_OK
                or all(c is not None for c in codes)):
            break
        time.sleep(0.05)
    failed = failures()
    stopped = [rank for rank, child in enumerate(job.children)
               if child.poll() is None and _stopped(child.pid)]
    if failed and not interrupted:  # the others are stopped by us: only report the first
        job.stop(signal.SIGTERM)
    return failed, stopped


def _report(layout: Layout, job: LocalJob, failed: list[tuple[int, int]], stopped: list[int],
            interrupted: list[int]) -> tuple[int, str | None]:
    """Say how the job ended, one line per failure; (its exit code, the cause the launcher
    found that no process could report: a rank killed by a signal, or stopped)."""
    if interrupted:
        job.gate.drop()
        name = signal.Signals(interrupted[0]).name
        print(f"sm-dist: stopped by {name}; the run directory keeps every finished iteration "
              "and checkpoint", file=sys.stderr)
        return EXIT_RUNTIME, None
    causes = [f"{layout.name(rank)} (rank {rank}, pid {job.children[rank].pid}) was stopped "
              "and answered nothing" for rank in stopped]
    killed = [(rank, code) for rank, code in failed if code < 0]
    if any(-code in EXTERNAL_SIGNALS for _, code in killed):
        killed = [(rank, code) for rank, code in killed if -code in EXTERNAL_SIGNALS]
    causes += [f"{layout.name(rank)} (rank {rank}, pid {job.children[rank].pid}) {_how(code)}"
               for rank, code in killed]
    if causes:  # what the other processes said follows from it (in stderr.log)
        job.gate.drop()
        for cause in causes:
            print(f"{ERROR} {cause}", file=sys.stderr)
        return EXIT_RUNTIME, causes[0]
    job.gate.release()
    if failed:
        for rank, code in failed:
            if rank not in job.gate.reported:  # it said nothing of why itself
                print(f"{ERROR} {layout.name(rank)} (rank {rank}, pid "
                      f"{job.children[rank].pid}) {_how(code)}", file=sys.stderr)
        return (EXIT_BAD_INPUT if {code for _, code in failed} == {EXIT_BAD_INPUT}
                else EXIT_RUNTIME), None
    late = [(rank, child.returncode) for rank, child in enumerate(job.children)
            if child.returncode not in (EXIT_OK, None)]
    for rank, code in late:  # killed after rank 0 finished: did not leave in time
        print(f"sm-dist: warning: {layout.name(rank)} (rank {rank}) {_how(code)} after the "
              "run finished", file=sys.stderr)
    return EXIT_OK, None
