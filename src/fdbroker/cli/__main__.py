"""``python -m fdbroker.cli``: the same as the ``fdbroker`` console script (and ``python -m fdbroker``)."""

import sys

from fdbroker.cli import main

sys.exit(main())
