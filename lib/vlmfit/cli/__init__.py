"""Command line: ``vlmfit COMMAND ...`` (also ``python -m vlmfit COMMAND ...``).

``HELP``, what ``vlmfit --help`` prints, lists the commands, the flag spellings and the exit
statuses; ``COMMANDS`` maps each command to its parser here, one module per stage.
"""

from __future__ import annotations

import importlib
import sys

#: ``vlmfit --help``
HELP = """Command line: ``vlmfit COMMAND ...`` (also ``python -m vlmfit COMMAND ...``).

Commands (``vlmfit COMMAND --help`` for each):

    tokens      visual-token cost of an image size for a model
    check       validate a dataset, exit 1 listing every problem
    data        generate the bundled shapes dataset
    preprocess  validate + budget + cache a dataset
    estimate    predicted peak GPU memory of a training step
    plan        predict peak memory and pick a config that fits
    reference   measured peak GPU memory beside the estimate
    train       SFT / DPO outside notebooks (RunConfig fields as flags)
    config      the RunConfig that train's flags give (defaults filled in)
    launch      vlmfit train on several GPUs / machines (accelerate)
    merge       merge a run's LoRA adapter into its base model
    notebook    run a notebook with papermill and render HTML
    index       rebuild reports/index.html
    watch       follow a run's metrics.jsonl: step, loss, ETA
    demo        the whole pipeline offline on CPU with a tiny model
    lab         JupyterLab on 127.0.0.1 with a token, URL printed

Flags take either spelling: ``--max-steps`` or ``--max_steps``. Exit status: 0, 1 when
the work failed (bad records, a failed notebook), 2 on a usage error (the usage and one
``error:`` line on stderr). Errors end in one line without a traceback
(``VLMFIT_DEBUG=1`` shows it). Each command's parser is in this package, one module per
stage (``budget``, ``data``, ``preprocess``, ``memory``, ``train``, ``report``, ``lab``);
the work is done by the stage's functions.
"""

#: command -> (module in vlmfit.cli, function)
COMMANDS = {
    "tokens": ("budget", "cli_tokens"),
    "check": ("data", "cli_check"),
    "data": ("data", "cli_data"),
    "preprocess": ("preprocess", "cli_preprocess"),
    "estimate": ("memory", "cli_estimate"),
    "plan": ("memory", "cli_plan"),
    "reference": ("memory", "cli_reference"),
    "train": ("train", "cli_train"),
    "config": ("train", "cli_config"),
    "launch": ("train", "cli_launch"),
    "merge": ("train", "cli_merge"),
    "notebook": ("report", "cli_notebook"),
    "index": ("report", "cli_index"),
    "watch": ("report", "cli_watch"),
    "demo": ("report", "cli_demo"),
    "lab": ("lab", "cli_lab"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(HELP)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from vlmfit.report.preflight import did_you_mean

        print(
            f"vlmfit: error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; "
            f"one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module, func = COMMANDS[name]
    return getattr(importlib.import_module(f"vlmfit.cli.{module}"), func)(rest)
