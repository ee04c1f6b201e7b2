"""Run a parameterized notebook headlessly (papermill) and render it to a static HTML report.

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

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import html
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlmfit import runs
from vlmfit.runs import atomic_write

REPORTS = Path("reports")
# Report order in the index: the pipeline's order, then anything else by name.
PIPELINE = ("preprocess", "profile", "sft", "dpo")
# Data the notebooks generate on demand (the bundled dataset): need not exist beforehand.
GENERATED_DATA = Path("data/shapes")
HUB_TIMEOUT_S = 5.0


class ParameterError(ValueError):
    """A launch that cannot run, found before the notebook starts."""


class NotebookFailed(RuntimeError):
    """The notebook raised; its report was still written (marked failed)."""


# ----------------------------------------------------------------------- parameters


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters cell's names, with inferred types and defaults (papermill.inspect)."""
    import papermill

    return papermill.inspect_notebook(str(path))


def parse_value(text: str) -> Any:
    """Make-variable strings into Python values: literals, booleans, None, else the string."""
    low = text.strip().lower()
    if low in {"none", "null"}:
        return None
    if low in {"true", "false"}:
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def did_you_mean(name: str, choices: list[str] | set[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_fields() -> set[str]:
    from vlmfit.config import FIELDS

    return set(FIELDS)


def check_parameters(path: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Known names only; RunConfig fields go into the notebook's ``extra`` when it has one.

    Returns the parameters to inject. Unknown names raise :class:`ParameterError` with a
    "did you mean" (papermill itself only warns and runs with the default).
    """
    known = notebook_parameters(path)
    params = dict(params)
    fields = _config_fields() if "extra" in known else set()
    extra = dict(params.get("extra") or {})
    for name in sorted(set(params) - set(known)):
        if name in fields:
            extra[name] = params.pop(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        hints = "; ".join(f"{n!r}{did_you_mean(n, set(known) | fields)}" for n in unknown)
        raise ParameterError(
            f"{Path(path).name}: unknown parameter {hints}; it takes: {', '.join(sorted(known))}"
            + (" and any RunConfig field (vlmfit train --help)" if fields else "")
        )
    bad = sorted(set(extra) - fields) if "extra" in known else []
    if bad:
        hints = "; ".join(f"{n!r}{did_you_mean(n, fields)}" for n in bad)
        raise ParameterError(f"extra: unknown RunConfig field {hints} (vlmfit train --help)")
    if extra:
        params["extra"] = extra
    return params


# ------------------------------------------------------------------------ preflight


def check_model(name: str) -> None:
    from vlmfit import registry

    try:
        registry.get(name)
    except registry.UnknownModelError:
        raise ParameterError(
            f"unknown MODEL {name!r}{did_you_mean(name, registry.names())}; "
            f"one of: {', '.join(registry.names())}"
        ) from None


def check_data(key: str, value: Any) -> None:
    if not value or not isinstance(value, str):
        return
    path = Path(value)
    if path.exists() or path.is_relative_to(GENERATED_DATA):
        return
    near = ""
    if path.parent.is_dir():
        near = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
    raise ParameterError(f"{key} {value!r}: no such file or folder{near}")


def hub_problem(model: str, weights: str, revision: str | None = None) -> tuple[str | None, bool]:
    """Whether a hub model can load: ``(problem or None, go_offline)``.

    Asks the hub once with a short timeout (``from_pretrained`` retries for minutes on a
    dead network). Unreachable but in the local cache: fine, and the run goes offline
    (``go_offline``) so no library retries either.
    """
    from vlmfit import registry

    spec = registry.get(model)
    if spec.tiny or weights != "hub":
        return None, False
    import huggingface_hub
    from huggingface_hub import constants

    rev = revision or spec.revision
    try:
        cached = huggingface_hub.try_to_load_from_cache(spec.hub_id, "config.json", revision=rev)
    except Exception:  # noqa: BLE001 - a malformed cache is "not cached"
        cached = None
    in_cache = isinstance(cached, str)
    fixes = (
        "WEIGHTS=random (the architecture, random weights), a tiny-* MODEL (offline), "
        "or WEIGHTS=<a local model folder>"
    )
    if constants.HF_HUB_OFFLINE:
        if in_cache:
            return None, False
        return f"{spec.hub_id}@{rev} is not in the local cache and HF_HUB_OFFLINE=1; {fixes}", False
    import urllib.error
    import urllib.request

    url = f"{constants.ENDPOINT}/api/models/{spec.hub_id}/revision/{rev}"
    headers = {}
    token = huggingface_hub.get_token()
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=HUB_TIMEOUT_S
        ):
            return None, False
    except urllib.error.HTTPError as e:
        if in_cache:
            return None, True
        what = "not found" if e.code == 404 else f"HTTP {e.code}"
        if e.code in (401, 403):
            what = "gated or private (log in: hf auth login)"
        return f"{spec.hub_id}@{rev}: {what} at {constants.ENDPOINT}; {fixes}", False
    except (OSError, ValueError) as e:
        if in_cache:
            return None, True
        reason = getattr(e, "reason", e)
        return (
            f"cannot reach {constants.ENDPOINT} for {spec.hub_id} ({reason}) and it is not "
            f"in the local cache; {fixes}"
        ), False


def run_id_of(notebook: Path, params: dict[str, Any]) -> str | None:
    """The run folder a training notebook writes (``run`` or ``<method>-<model>``)."""
    known = notebook_parameters(notebook)
    if "run" not in known:
        return None
    model = params.get("model", known.get("model", {}).get("default", "").strip("\"'"))
    return params.get("run") or f"{notebook.stem}-{model}"


def preflight(
    notebook: Path, params: dict[str, Any], *, overwrite: bool = False, dry_run: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a launch before the kernel starts; returns (parameters, environment to set).

    ``dry_run`` checks without touching run folders (``make train`` checks its DPO step
    before the SFT run that makes DPO's ``init_adapter`` exists).
    """
    params = check_parameters(notebook, params)
    extra = params.get("extra") or {}
    env: dict[str, str] = {}
    # Cheap local checks first, the network last.
    if "model" in params:
        check_model(params["model"])
        weights = params.get("weights", "hub")
        if weights not in ("hub", "random") and not Path(weights).is_dir():
            raise ParameterError(f"WEIGHTS {weights!r}: expected hub, random or a model folder")
    for key in ("data", "eval_data", "preference_eval_data"):
        check_data(key, params.get(key))
    adapter = params.get("init_adapter")
    if adapter and not dry_run and not Path(adapter).exists():
        runs_dir = Path(extra.get("runs_dir", "runs"))
        if not (runs_dir / adapter / "adapter").exists():
            raise ParameterError(
                f"init_adapter {adapter!r}: no {runs_dir / adapter / 'adapter'} "
                "(train the SFT run first: make sft)"
            )
    run = run_id_of(notebook, params)
    if run:
        path = Path(extra.get("runs_dir", "runs")) / run
        try:
            runs.check_run_dir(path, bool(params.get("resume")), overwrite)
        except runs.RunExistsError as e:
            raise ParameterError(str(e)) from None
    if "model" in params:
        problem, offline = hub_problem(
            params["model"], params.get("weights", "hub"), extra.get("revision")
        )
        if problem:
            raise ParameterError(problem)
        if offline:
            print(f"[{notebook.stem}] hub unreachable; using the cached {params['model']} offline")
            env["HF_HUB_OFFLINE"] = "1"
    if run and overwrite and not dry_run:  # every check passed: only now may a run be replaced
        runs.prepare_run_dir(path, bool(params.get("resume")), overwrite)
    return params, env


# ------------------------------------------------------------------------- progress


def _fmt_s(seconds: float) -> str:
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
        print(f"[{self.name}] {_fmt_s(time.time() - self.t0)} {text}", file=self.out, flush=True)

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
            text += f", ETA {_fmt_s(rate * (total - step))}"
    return text


# ------------------------------------------------------------------------------ HTML

_EXTERNAL = re.compile(
    r"<script[^>]+src=[\"']https?://[^>]*>\s*</script>|<link[^>]+href=[\"']https?://[^>]*>",
    re.IGNORECASE,
)
_EXTERNAL_IMPORT = re.compile(
    r"<script\b[^>]*>(?:(?!</script>).)*?\bimport\s*\(\s*[\"']https?://(?:(?!</script>).)*</script>",
    re.IGNORECASE | re.DOTALL,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERROR_TAG = "papermill-error-cell-tag"
STATUS_MARK = '<meta name="vlmfit-status" content="{}">'
_STYLE = """<style>
.vlmfit-failed{border:2px solid #c00;background:#fee;padding:.6em 1em;margin:1em 0}
.jp-OutputArea-output table td,.jp-OutputArea-output table th{text-align:right}
details.vlmfit-config summary{cursor:pointer;font-weight:bold}
</style>"""


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def report_notebook(nb):
    """The report's view of an executed notebook: results only.

    Drops stderr (library warnings, progress bars, "Loading weights"), papermill's error
    markers and cells left without output; turns an error into one line; moves cells
    tagged ``summary`` right after the title and ``appendix`` cells to the end.
    """
    nb = copy.deepcopy(nb)
    failed = [
        i
        for i, c in enumerate(nb.cells)
        if any(o.get("output_type") == "error" for o in c.get("outputs", []))
    ]
    if failed:  # what ran, up to the failure: later sections never ran
        nb.cells = nb.cells[: failed[0] + 1]
    cells = []
    for cell in nb.cells:
        if ERROR_TAG in _tags(cell):
            continue
        if cell.cell_type == "code":
            outs = []
            for o in cell.get("outputs", []):
                if o.get("output_type") == "stream" and o.get("name") == "stderr":
                    continue
                if o.get("output_type") == "error":
                    msg = _ANSI.sub("", f"{o.get('ename')}: {o.get('evalue')}")
                    o = {
                        "output_type": "display_data",
                        "metadata": {},
                        "data": {
                            "text/html": f'<div class="vlmfit-failed"><b>Failed here</b>: '
                            f"{html.escape(msg)}</div>",
                            "text/plain": msg,
                        },
                    }
                    from nbformat import from_dict

                    o = from_dict(o)
                outs.append(o)
            cell.outputs = outs
            if not outs:
                continue
        cells.append(cell)
    title = [c for c in cells[:1] if c.cell_type == "markdown"]
    rest = cells[len(title) :]
    summary = [c for c in rest if "summary" in _tags(c)]
    appendix = [c for c in rest if "appendix" in _tags(c)]
    body = [c for c in rest if c not in summary and c not in appendix]
    nb.cells = title + summary + body + appendix
    return nb


def to_html(nb_path: str | Path, title: str | None = None) -> str:
    """Static HTML of an executed notebook: no code, no stderr, nothing external."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)
    status = nb.metadata.get("vlmfit", {}).get("status", "ok")
    view = report_notebook(nb)
    if status == "failed":
        err = html.escape(nb.metadata["vlmfit"].get("error", ""))
        banner = nbformat.v4.new_markdown_cell(
            f'<div class="vlmfit-failed"><b>This notebook failed</b>: {err}. '
            "What ran before the failure is below; the full traceback is in "
            f"<code>{html.escape(Path(nb_path).name)}</code>.</div>"
        )
        view.cells.insert(1 if view.cells else 0, banner)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(view, resources={"metadata": {"name": title or ""}})
    # MathJax / require.js come from CDNs in nbconvert's template; reports need neither.
    body = _EXTERNAL.sub("", body)
    # The lab template also import()s mermaid from a CDN when a page has a diagram.
    body = _EXTERNAL_IMPORT.sub("", body)
    return body.replace("</head>", STATUS_MARK.format(status) + _STYLE + "</head>", 1)


def report_status(html_path: str | Path) -> str:
    """``ok`` / ``failed`` of a report (its executed notebook beside it, else its HTML)."""
    html_path = Path(html_path)
    nb = html_path.with_suffix(".ipynb")
    try:
        meta = json.loads(nb.read_text()).get("metadata", {})
        if meta.get("papermill", {}).get("exception"):
            return "failed"
        if "vlmfit" in meta:
            return meta["vlmfit"].get("status", "ok")
    except (OSError, ValueError):
        pass
    text = html_path.read_text(errors="replace")[:20000] if html_path.exists() else ""
    return "failed" if STATUS_MARK.format("failed") in text else "ok"


def _report_meta(html_path: Path) -> dict[str, Any]:
    try:
        return json.loads(html_path.with_suffix(".ipynb").read_text())["metadata"].get("vlmfit", {})
    except (OSError, ValueError, KeyError):
        return {}


# --------------------------------------------------------------------------- running


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
            runs.apply_umask(metrics.parent)
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
    print(f"[{name}] {notebook} -> {out_html} ({_fmt_s(time.time() - t0)})", flush=True)
    return out_nb, out_html


def _one_line(text: str) -> str:
    lines = [x for x in _ANSI.sub("", text).strip().splitlines() if x.strip()]
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


# ----------------------------------------------------------------------------- index


def _kind(html_path: Path) -> str:
    stem = _report_meta(html_path).get("notebook") or html_path.stem.split("-")[0]
    return stem if stem in PIPELINE else "other"


def write_index(reports_dir: str | Path = REPORTS, runs_dir: str | Path = "runs") -> Path:
    """``reports/index.html``: reports in pipeline order with their status, then the runs."""
    reports_dir = Path(reports_dir)
    pages = [p for p in reports_dir.glob("*.html") if p.name != "index.html"]
    order = {k: i for i, k in enumerate((*PIPELINE, "other"))}
    pages.sort(key=lambda p: (order[_kind(p)], p.stem))
    rows, report_of_run = [], {}
    for p in pages:
        meta, status = _report_meta(p), report_status(p)
        if meta.get("run"):
            report_of_run[meta["run"]] = p.name
        when = meta.get("finished", "")
        took = _fmt_s(meta["seconds"]) if "seconds" in meta else ""
        badge = "ok" if status == "ok" else "<b class=failed>FAILED</b>"
        err = f"<br><small>{html.escape(meta.get('error', ''))}</small>" if status != "ok" else ""
        rows.append(
            f"<tr class={status}><td>{_kind(p)}</td>"
            f'<td class=l><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a>{err}</td>'
            f"<td>{badge}</td><td>{took}</td><td>{when}</td></tr>"
        )
    run_rows = []
    for s in sorted(Path(runs_dir).glob("*/summary.json")):
        d = json.loads(s.read_text())
        run = str(d.get("run") or s.parent.name)
        page = report_of_run.get(run) or (
            f"{run}.html" if (reports_dir / f"{run}.html").exists() else None
        )
        link = f'<a href="{html.escape(page)}">{html.escape(run)}</a>' if page else html.escape(run)
        before = d.get("eval_before", {}).get("exact_match")
        after = d.get("eval_after", {}).get("exact_match")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        peak = d.get("peak_memory_gib")
        cells = [
            d.get("model"),
            d.get("method"),
            d.get("finetune"),
            d.get("global_step"),
            fmt(before),
            fmt(after),
            "-" if peak is None else f"{peak:.2f}",
            _fmt_s(d.get("runtime_s", 0)),
        ]
        run_rows.append(
            f"<tr><td class=l>{link}</td>"
            + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells)
            + "</tr>"
        )
    head = (
        "<tr><th>run (report)</th><th>model</th><th>method</th><th>finetune</th><th>steps</th>"
        "<th>exact match before</th><th>after</th><th>peak memory (GiB)</th>"
        "<th>train time</th></tr>"
    )
    n_failed = sum(report_status(p) != "ok" for p in pages)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmfit reports</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto;}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
td.l{{text-align:left}}tr.failed{{background:#fee}}.failed{{color:#c00}}
</style></head><body>
<h1>vlmfit reports</h1>
<h2>Reports</h2>
<p>{len(pages)} report(s) in pipeline order{f", <b class=failed>{n_failed} failed</b>" if n_failed else ""}.</p>
<table><tr><th>step</th><th>report</th><th>status</th><th>took</th><th>finished</th></tr>
{"".join(rows) or "<tr><td colspan=5>none yet</td></tr>"}</table>
<h2>Runs</h2><table>{head}{"".join(run_rows) or "<tr><td colspan=9>none yet</td></tr>"}</table>
<p>Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
</body></html>
"""
    out = reports_dir / "index.html"
    atomic_write(out, page)
    return out


# ------------------------------------------------------------------------------- CLI


def cli_notebook(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmfit notebook", description=__doc__)
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
