"""``python -m vlmfit``: see vlmfit.cli."""

import sys

from vlmfit.cli import main

sys.exit(main())
