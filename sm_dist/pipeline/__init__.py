"""The pipeline: the schedule as data, generic stages, the one executor of a schedule, and the
single-process pipeline that runs it."""
