"""``python -m fdbroker``: the same as the ``fdbroker`` console script."""

import sys

from fdbroker.cli import main

sys.exit(main())
