"""``vlmfit notebook`` and ``vlmfit index``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmfit.report.index import write_index
from vlmfit.report.preflight import ParameterError, parse_value, preflight
from vlmfit.report.runner import REPORTS, NotebookFailed, run_notebook

NOTEBOOK_HELP = """Run a parameterized notebook headlessly (papermill) and render it to a static HTML report.

    python -m vlmfit notebook notebooks/sft.ipynb --name sft-smolvlm -p model smolvlm -p max_steps 50

Writes ``reports/<name>.ipynb`` (executed, with every output) and ``reports/<name>.html``
(the report: results only) atomically, then ``reports/index.html``.

Before the kernel starts (``preflight``), mistakes stop in one line: an unknown parameter
or model gets a "did you mean"; a RunConfig field that the notebook does not list goes
into its ``extra`` dict; a data path must exist; a run id that already holds a run needs
``resume`` or ``--overwrite``; a hub model must be reachable (or cached) within seconds.
While the notebook runs, the terminal shows the section running and, for training, step,
loss and ETA from ``runs/<run>/metrics.jsonl``. A failing notebook still writes its report,
marked failed (in the page and in the index), and ends in one line without a traceback.
Values are parsed as Python literals where they look like one ("1" -> 1, "none" -> None).
The HTML opens offline: no external scripts, styles or fonts.
"""


def cli_notebook(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmfit notebook", description=NOTEBOOK_HELP)
    parser.add_argument("notebook")
    parser.add_argument("--name", help="report name (default: notebook stem)")
    parser.add_argument("--reports", default=str(REPORTS))
    parser.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of the same id"
    )
    parser.add_argument("--check", action="store_true", help="only the checks; run nothing")
    a = parser.parse_args(argv)
    params = {k: parse_value(v) for k, v in a.param}
    if a.check:
        try:
            preflight(Path(a.notebook), params, overwrite=a.overwrite, dry_run=True)
        except ParameterError as e:
            print(f"vlmfit: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        run_notebook(
            a.notebook,
            a.name,
            params,
            a.reports,
            progress=not a.no_progress,
            overwrite=a.overwrite,
        )
    except ParameterError as e:
        print(f"vlmfit: error: {e}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        write_index(a.reports)
        print(f"vlmfit: error: {e}", file=sys.stderr)
        return 1
    write_index(a.reports)
    return 0


def cli_index(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmfit index")
    parser.add_argument("--reports", default=str(REPORTS))
    parser.add_argument("--runs", default="runs")
    a = parser.parse_args(argv)
    print(write_index(a.reports, a.runs))
    return 0
