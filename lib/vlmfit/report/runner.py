"""Run a parameterized notebook headlessly (papermill) and write its report.

``run_notebook`` checks the launch (``preflight``), shows progress in the terminal while
the kernel runs, and writes ``reports/<name>.ipynb`` and ``.html``, a failure included.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlmfit.files import apply_umask, atomic_write
from vlmfit.report.preflight import notebook_parameters, parse_value, preflight, run_id_of
from vlmfit.report.render import ANSI, ERROR_TAG, to_html

REPORTS = Path("reports")


class NotebookFailed(RuntimeError):
    """The notebook raised; its report was still written (marked failed)."""


def clock(seconds: float) -> str:
    """Seconds as ``m:ss``, or ``h:mm:ss`` from an hour."""
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress(threading.Thread):
    """Terminal progress of a running notebook: its section, then training step/loss/ETA.

    Reads what papermill saves after each cell (the running cell and the last heading above
    it) and the run's ``metrics.jsonl``; at most one training line per ``every`` seconds.
    """

    def __init__(
        self,
        name: str,
        nb_path: Path,
        metrics: Path | None,
        max_steps: int = -1,
        epochs: float = 1.0,
        every: float = 10.0,
        out=None,
    ) -> None:
        super().__init__(daemon=True)
        self.name, self.nb_path, self.metrics = name, nb_path, metrics
        self.max_steps, self.epochs, self.every = max_steps, epochs, every
        self.out = out or sys.stdout
        self.stop = threading.Event()
        self.t0 = time.time()
        self._section = ""
        self._seen = 0
        self._last_print = 0.0
        self._rows: list[dict[str, Any]] = []
        self._last_say = time.time()
        self._last_line = ""
        self.heartbeat = 30.0  # seconds without a line before "... <section>"

    def say(self, text: str) -> None:
        self._last_say = time.time()
        print(f"[{self.name}] {clock(time.time() - self.t0)} {text}", file=self.out, flush=True)

    def _poll_section(self) -> None:
        try:
            nb = json.loads(self.nb_path.read_text())
        except (OSError, ValueError):
            return  # not written yet, or being written
        heading = ""
        for cell in nb.get("cells", []):
            src = "".join(cell.get("source", ""))
            if cell.get("cell_type") == "markdown":
                lines = [x for x in src.splitlines() if x.startswith("#")]
                heading = lines[0].lstrip("# ").strip() if lines else heading
            elif cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
                if heading and heading != self._section:
                    self._section = heading
                    self.say(heading)
                return

    def _poll_metrics(self, final: bool = False) -> None:
        if self.metrics is None or not self.metrics.exists():
            return
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            return
        new = [json.loads(x) for x in lines[self._seen :] if x.strip().endswith("}")]
        self._seen += len(new)
        self._rows += [r for r in new if "loss" in r]
        if not self._rows or not new and not final:
            return
        if not final and time.time() - self._last_print < self.every:
            return
        line = progress_line(self._rows, self.max_steps, self.epochs)
        if line != self._last_line:
            self._last_print, self._last_line = time.time(), line
            self.say(line)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self._poll_section()
            self._poll_metrics()
            if time.time() - self._last_say > self.heartbeat:  # long cells: still alive
                self.say(f"... {self._section}" if self._section else "...")

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=5)
        self._poll_metrics(final=True)


def progress_line(rows: list[dict[str, Any]], max_steps: int = -1, epochs: float = 1.0) -> str:
    """``step 40/120 (33%) loss 0.512 | 1.6 s/step, ETA 2:08`` from metrics.jsonl rows."""
    last = rows[-1]
    step = int(last["step"])
    total = int(last.get("max_steps") or 0) or (max_steps if max_steps and max_steps > 0 else 0)
    if not total and last.get("epoch"):
        total = round(step * epochs / last["epoch"])
    text = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
    text += f" loss {last['loss']:.4g}"
    if "rewards/accuracies" in last:
        text += f" reward acc {last['rewards/accuracies']:.2f}"
    recent = rows[-6:]  # the recent pace: early steps include warm-up
    if len(recent) >= 2 and step > recent[0]["step"]:
        rate = (last["time"] - recent[0]["time"]) / (step - recent[0]["step"])
        text += f" | {rate:.2g} s/step"
        if total and total >= step:
            text += f", ETA {clock(rate * (total - step))}"
    return text


def run_notebook(
    notebook: str | Path,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    reports_dir: str | Path = REPORTS,
    *,
    kernel: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Execute ``notebook`` with ``params``; returns (executed .ipynb, .html).

    Raises :class:`ParameterError` before the kernel starts (nothing written) and
    :class:`NotebookFailed` (one line) after writing the failed notebook's report.
    """
    import nbformat
    import papermill

    notebook = Path(notebook)
    params, env = preflight(notebook, dict(params or {}), overwrite=overwrite)
    reports_dir = Path(reports_dir)
    name = name or notebook.stem
    out_nb = reports_dir / f"{name}.ipynb"
    out_html = reports_dir / f"{name}.html"
    reports_dir.mkdir(parents=True, exist_ok=True)
    tmp_nb = reports_dir / f".{name}.running.ipynb"
    run = run_id_of(notebook, params)
    extra = params.get("extra") or {}
    metrics = Path(extra.get("runs_dir", "runs")) / run / "metrics.jsonl" if run else None
    defaults = {k: v.get("default") for k, v in notebook_parameters(notebook).items()}
    watcher = None
    if progress:

        def num(key: str, fallback: float) -> float:
            value = params.get(key, parse_value(str(defaults.get(key, fallback))))
            return float(value) if isinstance(value, int | float) else fallback

        watcher = Progress(
            name, tmp_nb, metrics, int(num("max_steps", -1)), num("num_train_epochs", 1.0)
        )
        watcher.start()
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.time()
    error: str | None = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(tmp_nb),
            parameters=params,
            kernel_name=kernel or "python3",
            progress_bar=False,
            cwd=str(Path.cwd()),
            log_output=False,
            # The kernel's own start-up warnings ("running over TCP without encryption":
            # it listens on loopback only) would land in the terminal between progress lines.
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )
    except papermill.PapermillExecutionError as e:
        heading = _failing_heading(tmp_nb, e.exec_count)
        error = _one_line(f"{e.ename}: {e.evalue}")
        error = f"{error} (in {heading})" if heading else error
    except Exception as e:  # noqa: BLE001 - the kernel died, or could not start
        error = _one_line(f"{type(e).__name__}: {e}")
        if not tmp_nb.exists():
            raise NotebookFailed(f"{name} failed before its first cell: {error}") from None
    finally:
        if watcher:
            watcher.finish()
        if metrics is not None:  # weights and checkpoints get the umask like every file
            apply_umask(metrics.parent)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb = nbformat.read(str(tmp_nb), as_version=4)
    nb.metadata["vlmfit"] = {
        "notebook": notebook.stem,
        "name": name,
        "run": run,
        "status": "failed" if error else "ok",
        "error": error or "",
        "seconds": round(time.time() - t0, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write(out_nb, nbformat.writes(nb))
    tmp_nb.unlink(missing_ok=True)
    atomic_write(out_html, to_html(out_nb, name))
    if error:
        raise NotebookFailed(f"{name} failed: {error}; report: {out_html}")
    print(f"[{name}] {notebook} -> {out_html} ({clock(time.time() - t0)})", flush=True)
    return out_nb, out_html


def _one_line(text: str) -> str:
    lines = [x for x in ANSI.sub("", text).strip().splitlines() if x.strip()]
    return (lines[0] if lines else "error")[:400]


def _failing_heading(nb_path: Path, exec_count: int | None) -> str:
    """The section heading above the cell that raised (for the one-line error)."""
    try:
        cells = json.loads(nb_path.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return ""
    heading = ""
    for cell in cells:
        if ERROR_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell["cell_type"] == "markdown":
            lines = [x for x in "".join(cell["source"]).splitlines() if x.startswith("#")]
            heading = lines[0].lstrip("# ").strip() if lines else heading
        elif cell.get("execution_count") == exec_count and exec_count is not None:
            return heading
    return ""
