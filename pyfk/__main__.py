"""`python -m pyfk`: the pyfk command line (see pyfk.cli)."""

import sys

from pyfk.cli import main

if __name__ == "__main__":
    sys.exit(main())
