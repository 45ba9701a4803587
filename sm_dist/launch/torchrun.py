"""torchrun as the launch scripts run it: the same arguments and agent, but the job's exit
code (2 when the first rank to fail saw bad input, else 1) instead of torchrun's 1, the ranks'
own one-line errors instead of torchrun's traceback of them, and without the noise of ranks
dying under each other (processes.NOISE).

    python -m sm_dist.launch.torchrun [torchrun arguments] -m sm_dist train JOB ...
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME
from sm_dist.launch.processes import forward_without_noise

# The agent's own log lines that repeat what the failing rank already said.
_REPEATS = ("failed (exitcode:", "Sending process", "Received ", "Worker group ")


class _DropRepeats(logging.Filter):
    """Keep the agent's log, less the lines that restate a rank's exit (the rank said why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _REPEATS)


def job_exit_code(codes: Sequence[int]) -> int:
    """The job's exit code from its failed ranks' codes (negative: killed by a signal)."""
    return EXIT_BAD_INPUT if codes and all(c == EXIT_BAD_INPUT for c in codes) else EXIT_RUNTIME


@contextmanager
def _stderr_without_noise() -> Iterator[None]:
    """This process's stderr, which the ranks inherit, through NOISE's filter while it lasts."""
    read, write = os.pipe()
    real = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    pump = threading.Thread(target=forward_without_noise,
                            args=(os.fdopen(read, "rb"), os.fdopen(real, "w")), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer gone (the ranks have exited): the pump ends
        pump.join(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Filters on handlers: records of the agent's loggers reach torch's handler by propagation.
    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_DropRepeats())
    # Each rank sets its torch threads itself (run.threads): torchrun need not warn about it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with _stderr_without_noise():
            run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as err:
        # The first rank to fail is the cause; the agent stopped the others after it.
        rank, first = err.get_first_failure()
        if first.exitcode < 0:  # a rank killed by a signal says nothing itself
            print(f"launch: error: rank {rank} was killed by {first.signal_name()}",
                  file=sys.stderr)
        return job_exit_code([first.exitcode])
    except SignalException as err:  # Ctrl-C or SIGTERM to the agent: the ranks saved and left
        print(f"launch: stopped by {err.sigval.name}; the run directory keeps every finished "
              "iteration and checkpoint", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the agent took over its signals
        print("launch: stopped by SIGINT before training started", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)
