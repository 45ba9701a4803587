"""The SM math core: pure and single-process (stage function, curvature, local loss, solvers)."""
