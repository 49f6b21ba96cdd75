"""`python -m trl_laser ...` is `trl-laser ...`."""

import sys

from trl_laser.cli import main


if __name__ == "__main__":
    sys.exit(main())
