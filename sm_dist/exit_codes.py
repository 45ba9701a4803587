"""The exit codes of every sm-dist command and process, defined once."""

EXIT_OK = 0
EXIT_RUNTIME = 1  # a runtime failure: a stage failed or died, the run was interrupted
EXIT_BAD_INPUT = 2  # bad input: job file, data, directories, world size
