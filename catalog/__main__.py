"""``python -m catalog``: see ``catalog.cli``."""

import sys

from catalog.cli import main

if __name__ == "__main__":
    sys.exit(main())
