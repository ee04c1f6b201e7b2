"""``vlmfit notebook``, ``vlmfit index`` and ``vlmfit watch``: reports and progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlmfit.cli.common import Parser, command

NOTEBOOK_HELP = """Run a parameterized notebook headlessly (papermill) and render it to a static HTML report.

    vlmfit notebook notebooks/sft.ipynb --name sft-smolvlm -p model smolvlm -p max_steps 50

Writes reports/<name>.ipynb (executed, with every output) and reports/<name>.html
(the report: results only) atomically, then reports/index.html.

Before the kernel starts (preflight), mistakes stop in one line: an unknown parameter
or model gets a "did you mean"; a RunConfig field that the notebook does not list goes
into its `extra` dict; a data path must exist; a run id that already holds a run needs
`resume` or --overwrite; a hub model must be reachable (or cached) within seconds.
A parameter left out keeps the notebook's value; the training notebooks' values are None,
so RunConfig's default (for the method) applies.
While the notebook runs, the terminal shows the section running and, for training, step,
loss and ETA from runs/<run>/metrics.jsonl. A failing notebook still writes its report,
marked failed (in the page and in the index), and ends in one line without a traceback.
Values are parsed as Python literals where they look like one ("1" -> 1, "none" -> None).
The HTML opens offline: no external scripts, styles or fonts.
"""


def notebook_parser() -> Parser:
    from vlmfit.report.runner import REPORTS

    p = Parser("notebook", NOTEBOOK_HELP)
    p.add_argument("notebook")
    p.add_argument("--name", help="report name (default: notebook stem)")
    p.add_argument("--reports", default=str(REPORTS), help=f"(default {REPORTS})")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of the same id"
    )
    p.add_argument("--check", action="store_true", help="only the checks; run nothing")
    return p


@command("notebook")
def cli_notebook(argv: list[str]) -> int:
    """``vlmfit notebook NOTEBOOK [-p NAME VALUE ...]``: 0; 1 when the notebook failed; 2 on
    a bad launch (ParameterError, before the kernel starts)."""
    from vlmfit.report.index import write_index
    from vlmfit.report.preflight import parse_value, preflight
    from vlmfit.report.runner import NotebookFailed, run_notebook

    a = notebook_parser().parse_args(argv)
    params = {k: parse_value(v) for k, v in a.param}
    if a.check:
        preflight(Path(a.notebook), params, overwrite=a.overwrite, dry_run=True)
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
    except NotebookFailed:
        write_index(a.reports)
        raise
    write_index(a.reports)
    return 0


@command("index")
def cli_index(argv: list[str]) -> int:
    """``vlmfit index``: rebuild reports/index.html."""
    from vlmfit.report.index import write_index
    from vlmfit.report.runner import REPORTS

    p = Parser("index", "Rebuild REPORTS/index.html, linking every report and run.")
    p.add_argument("--reports", default=str(REPORTS), help=f"(default {REPORTS})")
    p.add_argument("--runs", default="runs", help="(default runs)")
    a = p.parse_args(argv)
    print(write_index(a.reports, a.runs))
    return 0


@command("watch")
def cli_watch(argv: list[str]) -> int:
    """``vlmfit watch runs/<run>``: print step, loss and ETA as metrics.jsonl grows."""
    from vlmfit.report.runner import progress_line

    p = Parser("watch", "Print step, loss and ETA as runs/<run>/metrics.jsonl grows.")
    p.add_argument("run", help="run folder (runs/<run>) or run id")
    p.add_argument("--every", type=float, default=5.0, help="seconds between lines (5)")
    p.add_argument("--once", action="store_true", help="print the latest line and exit")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also mirror every metric into TensorBoard event files in DIR "
        "(needs the tensorboard package; then: tensorboard --logdir DIR)",
    )
    a = p.parse_args(argv)
    path = Path(a.run) if Path(a.run).is_dir() else Path("runs") / a.run
    log = path / "metrics.jsonl"
    cfg = path / "config.json"
    writer = None
    if a.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            p.error("--tensorboard needs the tensorboard package (pip install tensorboard)")
        writer = SummaryWriter(a.tensorboard)
    seen, mirrored = -1, 0
    while True:
        rows = []
        if log.exists():
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip().endswith("}")]
        if writer is not None:
            for r in rows[mirrored:]:
                for k, v in r.items():
                    if k not in ("step", "time", "epoch") and isinstance(v, int | float):
                        writer.add_scalar(k, v, r["step"], walltime=r.get("time"))
            mirrored = len(rows)
            writer.flush()
        rows = [r for r in rows if "loss" in r]
        if rows and len(rows) != seen:
            c = json.loads(cfg.read_text())["config"] if cfg.exists() else {}
            line = progress_line(rows, c.get("max_steps", -1), c.get("num_train_epochs", 1.0))
            print(f"{path.name}: {line}", flush=True)
            seen = len(rows)
        if a.once or (path / "summary.json").exists():
            if writer is not None:
                writer.close()
            if not rows:
                print(f"{path.name}: no training steps logged yet ({log})")
            return 0
        time.sleep(a.every)


@command("demo")
def cli_demo(argv: list[str]) -> int:
    """``vlmfit demo``: the whole pipeline offline on CPU (vlmfit.report.demo)."""
    from vlmfit.report import demo

    p = Parser("demo", demo.__doc__)
    p.add_argument("--reports", default="reports", help="(default reports)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--model", default=demo.MODEL, help=f"(default {demo.MODEL})")
    a = p.parse_args(argv)
    return demo.run_demo(a.reports, seed=a.seed, model=a.model)
