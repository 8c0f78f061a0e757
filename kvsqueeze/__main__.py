"""``python -m kvsqueeze``: the same command line as the ``kvsqueeze`` script (see :mod:`kvsqueeze.cli`)."""

import sys

from kvsqueeze.cli import main

if __name__ == "__main__":
    sys.exit(main())
