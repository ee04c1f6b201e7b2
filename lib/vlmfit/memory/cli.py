"""The memory commands' parsers live in :mod:`vlmfit.cli.memory`; re-exported here."""

from vlmfit.cli.memory import cli_estimate, cli_plan, cli_reference

__all__ = ["cli_estimate", "cli_plan", "cli_reference"]
