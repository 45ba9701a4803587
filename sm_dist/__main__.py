"""`python -m sm_dist`: the sm-dist command line."""

import sys

from sm_dist.cli import main

sys.exit(main())
