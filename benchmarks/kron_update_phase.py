"""What sm_kron adds to a GPipe+Adam iteration, per stage and in all, simulated from measured costs.

For each workload, one process trains the same job with Adam and with sm_kron, one after the
other (never side by side), a few iterations each, every action timed (actions.json), the pair
--repeats times in turn; each is replayed on one device per stage (`sm-dist simulate`, GPipe,
the --link), and of each optimizer's repeats the fastest simulated iteration is kept (on a
shared machine the others measured someone else's load too). It prints
per stage the measured cost per microbatch of the forward and backward (sm_kron's backward
holds the λ it sends down; a convolution's, its terms and its share of A and U), the update
actions of an iteration (K: stage 0's Gram factor in its bubble; L: the closed-form steps;
A: apply), and
what sm_kron adds over Adam on that stage as a share of Adam's simulated iteration; then both
simulated iteration times and their ratio, the figure the acceptance of issue 25 bounds
(at most 1.3). With --fill, also sm_kron in fill mode, and its simulated iteration time over
sm_kron's without it (at most 1.02): of the fastest of each, and the median of the pairs
trained one after the other (which share the machine's load of the moment). --kron-set
KEY=VALUE (repeatable) overrides an sm_kron option in its runs only, Adam's staying as they are
(e.g. optimizer.refresh_every=4).

    python benchmarks/kron_update_phase.py [--workloads mlp4,mlp8,cnn] [--iterations 6]
                                           [--repeats 3] [--fill] [--kron-set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MLP_JOB = "docs/results/fashion-cpu.yaml"
WORKLOADS = {  # name: (job file, overrides making it)
    "mlp4": (MLP_JOB, []),
    "mlp8": (MLP_JOB, ["model.mlp.widths=[784,128,128,128,128,128,128,128,10]",
                       "model.balance=[2,2,2,2]"]),
    "cnn": ("configs/fashion/cnn-sm.yaml", []),
    "transformer": ("configs/text/transformer-sm.yaml", []),
}
OPTIMIZERS = {"adam": ["optimizer.name=adam"], "sm_kron": ["optimizer.name=sm_kron"]}
# sm_kron filling its bubbles: the CG steps of its stages without a bound (the transformer's)
# go on until their next input, and stop on time; its stages with one have no steps to add.
FILL = ["optimizer.name=sm_kron",
        "optimizer.inner_steps={min: 10, max: 200, fill_bubbles: true}"]
UPDATE_KINDS = ("K", "L", "I", "W", "A")


def train(job: str, sets: list[str], out: Path) -> None:
    args = [sys.executable, "-m", "sm_dist", "train", job, "--single-process", "--no-live",
            "--out", str(out)]
    for value in sets:
        args += ["--set", value]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kron_update_phase: {' '.join(args)} failed:\n{done.stderr}")


def per_iteration(events: list, stage: int, kinds: tuple[str, ...], iterations: list[int]
                  ) -> float:
    """Mean seconds per iteration that `stage` spends on `kinds` in the simulated timeline."""
    total = sum(e.end - e.start for e in events
                if e.stage == stage and e.kind.letter in kinds and e.iteration in iterations)
    return total / len(iterations)


def main() -> None:
    from sm_dist.report.run_data import load_run
    from sm_dist.report.simulate import simulate_run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="mlp4,mlp8,cnn")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--link", default="pcie4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fill", action="store_true", help="also sm_kron in fill mode")
    parser.add_argument("--kron-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the sm_kron runs only (repeatable)")
    args = parser.parse_args()
    if bad := [value for value in args.kron_set if not value.startswith("optimizer.")]:
        parser.error(f"--kron-set {bad[0]}: only optimizer.* keys (the job is the same for Adam)")
    common = [f"run.iterations={args.iterations}", "run.eval_every=0",
              "run.checkpoint_every=0", "run.threads=1"]
    print(f"python benchmarks/kron_update_phase.py --workloads {args.workloads} "
          f"--iterations {args.iterations} --link {args.link} --repeats {args.repeats}"
          + (" --fill" if args.fill else "")
          + "".join(f" --kron-set {value}" for value in args.kron_set))
    chosen_runs = {**OPTIMIZERS, **({"sm_kron fill": FILL} if args.fill else {})}
    chosen_runs = {name: [*sets, *(args.kron_set if "sm_kron" in name else [])]
                   for name, sets in chosen_runs.items()}
    worst_ratio = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            job, sets = WORKLOADS[workload]
            sims: dict = {}
            fill_ratios: list[float] = []  # fill mode over sm_kron, repeat by repeat
            for repeat in range(args.repeats):
                times: dict[str, float] = {}
                for name, chosen in chosen_runs.items():
                    out = Path(tmp) / f"{workload}-{name.replace(' ', '-')}-{repeat}"
                    train(job, [*common, *sets, *chosen], out)
                    sim = simulate_run(load_run(out), args.link)
                    times[name] = sim.utilisation()["iteration_time"]
                    if name not in sims or times[name] < sims[name].utilisation()[
                            "iteration_time"]:
                        sims[name] = sim
                if "sm_kron fill" in times:
                    fill_ratios.append(times["sm_kron fill"] / times["sm_kron"])
            adam, kron = sims["adam"], sims["sm_kron"]
            steady = kron.iterations[1:-1] or kron.iterations
            t_adam = adam.utilisation()["iteration_time"]
            t_kron = kron.utilisation()["iteration_time"]
            stages = 1 + max(e.stage for e in kron.events)
            print(f"\n{workload}: {job} {' '.join(sets)}; {kron.microbatches} microbatches, "
                  f"GPipe on {stages} devices, link {args.link}; ms")
            print("stage  F adam  F kron  B adam  B kron  update kron (K+L+A)  "
                  "added / Adam iteration")
            for s in range(stages):
                def unit(sim: object, letter: str, s: int = s) -> float:
                    return sim.costs.seconds.get((s, letter), 0.0)  # type: ignore[attr-defined]

                update = per_iteration(kron.events, s, UPDATE_KINDS, steady)
                adam_update = per_iteration(adam.events, s, UPDATE_KINDS,
                                            adam.iterations[1:-1] or adam.iterations)
                added = (update - adam_update + kron.microbatches * (
                    unit(kron, "F") - unit(adam, "F") + unit(kron, "B") - unit(adam, "B")))
                print(f"{s:5d} {1e3 * unit(adam, 'F'):7.2f} {1e3 * unit(kron, 'F'):7.2f} "
                      f"{1e3 * unit(adam, 'B'):7.2f} {1e3 * unit(kron, 'B'):7.2f} "
                      f"{1e3 * update:20.2f} {added / t_adam:23.1%}")
            ratio = t_kron / t_adam
            worst_ratio = max(worst_ratio, ratio)
            print(f"iteration (simulated, steady): Adam {1e3 * t_adam:.2f} ms, sm_kron "
                  f"{1e3 * t_kron:.2f} ms: ratio {ratio:.2f} (target <= 1.30)")
            if fill_ratios:
                t_fill = sims["sm_kron fill"].utilisation()["iteration_time"]
                print(f"sm_kron in fill mode: {1e3 * t_fill:.2f} ms, {t_fill / t_kron:.3f} of "
                      "sm_kron's without it (target <= 1.02)")
                fill = sims["sm_kron fill"]
                fill_steady = fill.iterations[1:-1] or fill.iterations
                filled = max(per_iteration(fill.events, s, ("W",), fill_steady)
                             for s in range(stages))
                print(f"  its fill actions (W): {1e3 * filled:.2f} ms per iteration on the "
                      "busiest stage; the rest of the difference is the two runs' own costs")
                # Run next to each other, a pair shares the machine's load of the moment.
                print(f"  the same, pair by pair (run one after the other): median "
                      f"{statistics.median(fill_ratios):.3f}, from {min(fill_ratios):.3f} to "
                      f"{max(fill_ratios):.3f} over {len(fill_ratios)} pairs")
    print(f"\nworst ratio over the workloads: {worst_ratio:.2f}")


if __name__ == "__main__":
    main()
