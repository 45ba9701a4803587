"""The per-stage figures printed under a run's summary: the pipeline's busy and idle shares,
the slowest replica of each stage, and memory."""

from __future__ import annotations

from typing import Any


def utilisation_text(summary: dict[str, Any], width: int | None = None) -> str | None:
    """The pipeline's busy and idle shares per stage, as printed at the end of a run; with
    `width`, the stages are split over several blocks so that no line is wider."""
    busy = summary.get("mean_busy_fraction")
    if not busy:
        return None
    bubble = summary.get("mean_bubble_fraction")
    rows = [("busy", busy), ("idle forward->back", summary.get("mean_turnaround_idle")),
            ("idle back->forward", summary.get("mean_update_idle"))]
    memory = summary.get("peak_memory_mb")
    memory_rows = []
    if _memory_per_stage(summary):
        memory_rows = [("peak memory MiB", memory),
                       ("added by training", summary.get("training_memory_mb"))]
    per_block = len(busy) if width is None else max(1, (width - 21) // 5)
    lines = [f"pipeline (means over steady iterations; bubble "
             f"{'-' if bubble is None else format(bubble, '.0%')}):"]
    for first in range(0, len(busy), per_block):
        stages = range(first, min(first + per_block, len(busy)))
        lines.append(f"  {'stage':<19}{''.join(f'{s:>5}' for s in stages)}")
        for label, values in rows:
            if values:
                lines.append(f"  {label:<19}" + "".join(
                    "    -" if values[s] is None else f"{values[s]:5.0%}" for s in stages))
        for label, values in memory_rows:
            if values:
                lines.append(f"  {label:<19}" + "".join(f"{values[s]:5.0f}" for s in stages))
        if slowest := summary.get("slowest_replica"):  # the rows above: replicas' means
            lines.append(f"  {'slowest replica':<19}" + "".join(f"{slowest[s]:5d}" for s in stages))
    return "\n".join(lines)


def _memory_per_stage(summary: dict[str, Any]) -> bool:
    """Whether the utilisation block has a memory row per stage (one process per stage)."""
    busy, peak = summary.get("mean_busy_fraction"), summary.get("peak_memory_mb")
    return bool(busy and peak and len(peak) == len(busy))


def memory_text(summary: dict[str, Any]) -> str | None:
    """One line: the largest peak memory of the run's processes and what training added; None
    where the utilisation block already shows it per stage."""
    peak, added = summary.get("peak_memory_mb"), summary.get("training_memory_mb")
    if not peak or _memory_per_stage(summary):
        return None
    where = "the one process" if len(peak) == 1 else "the largest stage process"
    kind = "resident" if summary.get("memory_kind") == "resident" else "CUDA allocated"
    most = max(range(len(peak)), key=lambda s: peak[s])
    text = f"peak memory ({kind}, {where}): {peak[most]:.0f} MiB"
    return text + (f", {added[most]:.0f} MiB of it added by training" if added else "")
