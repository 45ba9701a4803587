"""One training run on the coordinator: the loop, its records, the run directory,
checkpoints, the live monitor."""
