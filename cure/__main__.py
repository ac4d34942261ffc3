"""``python -m cure ...`` is the ``cure`` command (so ``torchrun ... -m cure train ...`` works too)."""

import sys

from cure.cli import main

if __name__ == "__main__":
    sys.exit(main())
