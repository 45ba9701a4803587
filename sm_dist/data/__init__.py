"""Data: in-memory datasets, their job-file section, and the batches that feed training."""
