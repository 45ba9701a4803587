"""sm-dist: pipeline-parallel training with the Surrogate Minimization optimizer."""

__version__ = "0.2.0"
