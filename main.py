"""``python main.py COMMAND ...`` is ``vitlab COMMAND ...``."""

import sys

from vitlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
