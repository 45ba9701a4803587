"""Starting a job: the stage processes on this machine, a rank's part of the job, torchrun."""
