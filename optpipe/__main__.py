"""`python -m optpipe …` runs the command line, as `optpipe …` does."""

import sys

from optpipe.cli import main

sys.exit(main())
