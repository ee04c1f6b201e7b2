"""Command line: ``python -m vlmfit COMMAND ...`` (also installed as ``vlmfit``).

Commands (each module parses its own arguments, so ``--help`` works per command):

    tokens   visual-token cost of an image size for a model     (vlmfit.budget)
    check    validate a dataset, exit 1 listing every problem   (vlmfit.data.validate)
    data     generate the bundled shapes dataset                (vlmfit.data.synth)
    plan     predict peak memory and pick a config that fits    (vlmfit.memory)
    notebook run a notebook with papermill and render HTML      (vlmfit.nbrun)
    train    SFT / DPO / evaluate outside notebooks             (vlmfit.train)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "tokens": ("vlmfit.budget", "cli_tokens"),
    "check": ("vlmfit.data.validate", "cli_check"),
    "data": ("vlmfit.data.synth", "main"),
    "plan": ("vlmfit.memory", "cli_plan"),
    "notebook": ("vlmfit.nbrun", "cli_notebook"),
    "train": ("vlmfit.train", "cli_train"),
    "index": ("vlmfit.nbrun", "cli_index"),
    "preprocess": ("vlmfit.preprocess", "cli_preprocess"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlmfit: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)
