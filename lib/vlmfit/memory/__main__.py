"""``python -m vlmfit.memory``: the same as ``python -m vlmfit plan``."""

import sys

from vlmfit.cli.memory import cli_plan

raise SystemExit(cli_plan(sys.argv[1:]))
