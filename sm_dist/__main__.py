"""`python -m sm_dist`: the sm-dist command line."""

import os
import signal
import sys

# Ctrl-C while torch is being imported would print a traceback of the imports: leave quietly
# instead, until the command line (or, in a stage process, the engine) handles it.
signal.signal(signal.SIGINT, signal.SIG_DFL)
from sm_dist.cli import main  # noqa: E402

if "RANK" not in os.environ:
    signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
