"""Starting a job's stage processes on this machine (`sm-dist train`): one child per stage,
their store on loopback, children that die with the launcher, a failure named by stage, rank
and pid, one line for an interruption, and the noise of dying peers filtered out."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import IO

from sm_dist.engine.layout import Layout
from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME

LAUNCHED = "SM_DIST_LAUNCHED"  # set in the children: the launcher reports for them
# Lines a process writes when a neighbour dies under it: TensorPipe's and gloo's warnings,
# C++'s last words. The failure itself is reported once, by stage and rank.
NOISE = re.compile(r"^\[[WE] ?\d*.*(tensorpipe|TensorPipe|ProcessGroupGloo|socket\.cpp|"
                   r"thread_pool\.cpp:\d+\] Exception in thread pool task: unknown)|"
                   r"^terminate called without an active exception|"
                   r"^FATAL: exception not rethrown|"
                   r"^\s*$")
GRACE = 10.0  # seconds a child may take to finish after the others are done or stopped


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
        self.children: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for rank in range(num_ranks):
            child = subprocess.Popen(
                [sys.executable, *args], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent)
            self.children.append(child)
            pump = threading.Thread(target=forward_without_noise, args=(child.stderr, sys.stderr),
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


def launch_local(layout: Layout, args: Sequence[str], timeout: float) -> int:
    """Run `python ARGS` as every rank of a job of `layout` (stages x replicas processes) on
    this machine; the job's exit code: 0, 2 when every failed rank exited 2 (bad input), else
    1. Ranks are named by stage (and replica) in what it says."""
    job = LocalJob(layout.world_size, args, timeout)
    interrupted: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        job.stop(signal.SIGTERM)  # rank 0 saves what is finished, then leaves

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed: list[tuple[int, int]] = []
        stopped: list[int] = []
        while True:
            codes = [child.poll() for child in job.children]
            failed = [(rank, code) for rank, code in enumerate(codes)
                      if code not in (None, EXIT_OK)]
            if failed or interrupted or codes[0] == EXIT_OK or all(c is not None
                                                                   for c in codes):
                break
            time.sleep(0.05)
        stopped = [rank for rank, child in enumerate(job.children)
                   if child.poll() is None and _stopped(child.pid)]
        if failed and not interrupted:  # the others are stopped by us: only report the first
            job.stop(signal.SIGTERM)
        job.reap()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        name = signal.Signals(interrupted[0]).name
        print(f"sm-dist: stopped by {name}; the run directory keeps every finished iteration "
              "and checkpoint", file=sys.stderr)
        return EXIT_RUNTIME
    for rank in stopped:  # the likely cause: its neighbours waited for it and gave up
        print(f"sm-dist: error: {layout.name(rank)} (rank {rank}, pid "
              f"{job.children[rank].pid}) was stopped and answered nothing", file=sys.stderr)
    if failed:
        for rank, code in failed:
            # A runtime failure has said why itself (rank 0's names the stage, a stage's
            # names the coordinator); one caused by a stopped stage is its consequence.
            if code != EXIT_RUNTIME or (rank != 0 and not stopped):
                print(f"sm-dist: error: {layout.name(rank)} (rank {rank}, pid "
                      f"{job.children[rank].pid}) {_how(code)}", file=sys.stderr)
        return EXIT_BAD_INPUT if {code for _, code in failed} == {EXIT_BAD_INPUT} \
            else EXIT_RUNTIME
    late = [(rank, child.returncode) for rank, child in enumerate(job.children)
            if child.returncode not in (EXIT_OK, None)]
    for rank, code in late:  # killed after rank 0 finished: did not leave in time
        print(f"sm-dist: warning: {layout.name(rank)} (rank {rank}) {_how(code)} after the "
              "run finished", file=sys.stderr)
    return EXIT_OK
