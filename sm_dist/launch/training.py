"""One training run to its end, the same for the engine's coordinator and for one process: the
run directory written as it trains, then the summary and plots, also after a diverging loss
stopped it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sm_dist.config.job import JobConfig
from sm_dist.data.datasets import Dataset
from sm_dist.pipeline.interface import Pipeline
from sm_dist.report.summary import finish_run
from sm_dist.run.session import run_training
from sm_dist.run.trainer import NonFiniteLoss


def train_to_the_end(job: JobConfig, pipeline: Pipeline, data: Dataset, out: Path, *,
                     header: str, live: bool | None, console: Console, resume: bool = False,
                     hosts: dict[int, str] | None = None) -> None:
    """Train `job` on `pipeline` into `out` and write its summary and plots. A diverged run
    (NonFiniteLoss) gets its summary of what it trained, then the error goes to the caller."""
    try:
        run_training(job, pipeline, data, out, header=header, live=live, console=console,
                     resume=resume, hosts=hosts)
    except NonFiniteLoss:
        finish_run(out, console)
        raise
    finish_run(out, console)
