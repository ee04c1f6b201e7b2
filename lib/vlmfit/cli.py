"""Command line: ``python -m vlmfit COMMAND ...`` (also installed as ``vlmfit``).

Commands (``vlmfit COMMAND --help`` for each):

    tokens      visual-token cost of an image size for a model     (vlmfit.budget)
    check       validate a dataset, exit 1 listing every problem   (vlmfit.data.validate)
    data        generate the bundled shapes dataset                (vlmfit.data.synth)
    preprocess  validate + budget + cache a dataset                (vlmfit.preprocess)
    estimate    predicted peak GPU memory of a training step       (vlmfit.memory)
    plan        predict peak memory and pick a config that fits    (vlmfit.memory)
    reference   measured peak GPU memory beside the estimate       (vlmfit.memory)
    train       SFT / DPO / evaluate outside notebooks             (vlmfit.train)
    notebook    run a notebook with papermill and render HTML      (vlmfit.report)
    index       rebuild reports/index.html                         (vlmfit.report)
    watch       follow a run's metrics.jsonl: step, loss, ETA      (vlmfit.cli)
    lab         JupyterLab on 127.0.0.1 with a token, URL printed  (vlmfit.cli)

Flags take either spelling: ``--max-steps`` or ``--max_steps``. Errors end in one line
without a traceback (``VLMFIT_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

COMMANDS = {
    "tokens": ("vlmfit.budget", "cli_tokens"),
    "check": ("vlmfit.data.validate", "cli_check"),
    "data": ("vlmfit.data.synth", "main"),
    "estimate": ("vlmfit.memory.cli", "cli_estimate"),
    "plan": ("vlmfit.memory.cli", "cli_plan"),
    "reference": ("vlmfit.memory.cli", "cli_reference"),
    "notebook": ("vlmfit.report.cli", "cli_notebook"),
    "train": ("vlmfit.cli", "cli_train"),
    "index": ("vlmfit.report.cli", "cli_index"),
    "preprocess": ("vlmfit.preprocess", "cli_preprocess"),
    "watch": ("vlmfit.cli", "cli_watch"),
    "lab": ("vlmfit.cli", "cli_lab"),
}


# ------------------------------------------------------------- --max-steps == --max_steps


@contextlib.contextmanager
def both_spellings() -> Iterator[None]:
    """Let every argparse parser accept ``--a-b`` for ``--a_b`` and the reverse.

    Each command builds its own parser; rather than registering aliases in each, argv is
    rewritten at parse time to the spelling that parser knows.
    """
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = self._option_string_actions
        fixed = []
        for tok in args:
            opt, eq, val = tok.partition("=")
            if opt.startswith("--") and len(opt) > 2 and opt not in known:
                for alt in ("--" + opt[2:].replace("_", "-"), "--" + opt[2:].replace("-", "_")):
                    if alt in known:
                        tok = alt + eq + val
                        break
            fixed.append(tok)
        return original(self, fixed, namespace)

    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------- vlmfit train


def config_comments() -> dict[str, tuple[str, str]]:
    """``{field: (section, comment)}`` from RunConfig's source: the comment inside each
    field's statement (trailing, or inside its parentheses), the section from the last
    standalone comment line above it."""
    import ast
    import io
    import tokenize

    from vlmfit.config import RunConfig

    src, first = inspect.getsourcelines(RunConfig)
    text = "".join(src)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    cls = ast.parse(text).body[0]
    out: dict[str, tuple[str, str]] = {}
    section, taken = "", set()
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = [n for n in comments if n < node.lineno and n not in taken]
        for n in sorted(above):
            if src[n - 1].lstrip().startswith("#"):
                section = comments[n]
            taken.add(n)
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        taken.update(range(node.lineno, node.end_lineno + 1))
        out[node.target.id] = (section, " ".join(own))
    return out


def train_help() -> str:
    """``vlmfit train --help``: every RunConfig field with its default and meaning."""
    from vlmfit.config import RunConfig

    comments = config_comments()
    lines = [
        "usage: vlmfit train [--FIELD VALUE ...] [--overwrite [true]]",
        "       vlmfit train --merge RUN [--out FOLDER]",
        "",
        "SFT or DPO outside the notebooks, with vlmfit.config.RunConfig fields as flags",
        "(--max-steps or --max_steps). Writes runs/<run>/; an existing run is continued",
        "with --resume true, replaced with --overwrite, else refused.",
    ]
    section = None
    for f in dataclasses.fields(RunConfig):
        sec, meaning = comments.get(f.name, ("", ""))
        if sec != section:
            section = sec
            lines += ["", f"{sec or 'Fields'}:"]
        default = (
            f.default_factory()
            if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING
            else f.default
        )
        flag = f"--{f.name.replace('_', '-')}"
        lines.append(f"  {flag:32} default {default!r}")
        if meaning:
            lines.append(f"  {'':32} {meaning}")
    lines += [
        "",
        "Other:",
        f"  {'--merge RUN':32} merge RUN's LoRA adapter into its base model",
        f"  {'--out FOLDER':32} where --merge writes (default runs/RUN/merged)",
    ]
    return "\n".join(lines)


def _train_overrides(argv: list[str]) -> dict[str, str]:
    out, it = {}, iter(argv)
    for tok in it:
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            out[key.replace("-", "_")] = val if eq else next(it, "")
    return out


def cli_train(argv: list[str]) -> int:
    """``vlmfit train``: help, did-you-mean and run protection, then vlmfit.train.cli_train."""
    from vlmfit.config import FIELDS, RunConfig
    from vlmfit.report.preflight import did_you_mean
    from vlmfit.train import runs

    if {"-h", "--help"} & set(argv):
        print(train_help())
        return 0
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if "--merge" in argv or any(a.startswith("--merge=") for a in argv):
        from vlmfit import train

        return int(train.cli_train(argv) or 0)
    overrides = _train_overrides(argv)
    unknown = sorted(set(overrides) - FIELDS)
    if unknown:
        dashed = {"--" + f.replace("_", "-") for f in FIELDS}
        hints = "; ".join(
            f"--{k.replace('_', '-')}{did_you_mean('--' + k.replace('_', '-'), dashed)}"
            for k in unknown
        )
        raise SystemExit(f"vlmfit train: error: unknown option {hints} (vlmfit train --help)")
    d = RunConfig()
    method = overrides.get("method", d.method)
    run = overrides.get("run") or f"{method}-{overrides.get('model', d.model)}"
    resume = str(overrides.get("resume", "")).lower() in {"1", "true", "yes", "on"}
    # Refuse here; with --overwrite, train.run replaces the old run once the config is valid.
    runs.check_run_dir(
        Path(overrides.get("runs_dir", d.runs_dir)) / run, resume=resume, overwrite=overwrite
    )
    _hub_preflight(argv)  # the network last
    if overwrite and "overwrite" in FIELDS:  # once RunConfig carries it, train.run decides
        argv = [*argv, "--overwrite", "true"]
    from vlmfit import train

    return int(train.cli_train(argv) or 0)


# ---------------------------------------------------------------------- vlmfit watch


def cli_watch(argv: list[str]) -> int:
    """``vlmfit watch runs/<run>``: print step, loss and ETA as metrics.jsonl grows."""
    from vlmfit.report.runner import progress_line

    p = argparse.ArgumentParser(prog="vlmfit watch", description=cli_watch.__doc__)
    p.add_argument("run", help="run folder (runs/<run>) or run id")
    p.add_argument("--every", type=float, default=5.0, help="seconds between lines")
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
            raise SystemExit(
                "vlmfit watch: error: --tensorboard needs the tensorboard package "
                "(pip install tensorboard)"
            ) from None
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


# ------------------------------------------------------------------------ vlmfit lab


def lab_command(ip: str, port: int, root: bool | None = None) -> list[str]:
    """The ``jupyter lab`` command line (the token travels in JUPYTER_TOKEN, not argv)."""
    root = os.geteuid() == 0 if root is None else root
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--ip={ip}",
        f"--port={port}",
        "--no-browser",
        "--ServerApp.port_retries=0",  # the printed URL is the port it listens on, or it fails
        "--ServerApp.log_level=WARN",  # its INFO lines would bury the URL printed below
        f"--ServerApp.allow_remote_access={ip not in ('127.0.0.1', 'localhost')}",
    ]
    if root:  # a root shell on a host or a root container: Jupyter refuses without it
        cmd.append("--allow-root")
    return cmd


def _listening(port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout):
        return True
    return False


def cli_lab(argv: list[str]) -> int:
    """``vlmfit lab``: JupyterLab with a token; prints the full URL once it listens."""
    p = argparse.ArgumentParser(prog="vlmfit lab", description=cli_lab.__doc__)
    p.add_argument("--ip", default="127.0.0.1", help="interface (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8888)
    a = p.parse_args(argv)
    if _listening(a.port):
        raise SystemExit(f"vlmfit lab: error: port {a.port} is taken; choose LAB_PORT=<port>")
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    env = dict(os.environ, JUPYTER_TOKEN=token)
    proc = subprocess.Popen(lab_command(a.ip, a.port), env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    url = f"http://127.0.0.1:{a.port}/lab?token={token}"
    while proc.poll() is None:
        if _listening(a.port):
            where = (
                " (published on the host's 127.0.0.1 by docker run -p 127.0.0.1:PORT:PORT)"
                if os.environ.get("VLMFIT_IN_CONTAINER") == "1"
                else ""
            )
            print(f"\nJupyterLab is running{where}; open:\n\n    {url}\n", flush=True)
            break
        time.sleep(0.3)
    return proc.wait()


# ----------------------------------------------------------------------------- main


def models_help() -> str:
    from vlmfit.models import registry

    rows = [
        f"  {n:18} {'offline tiny model' if m.tiny else m.hub_id}"
        + (f" ({m.params_b:g}B)" if m.params_b else "")
        for n, m in registry.MODELS.items()
    ]
    return "models (--model):\n" + "\n".join(rows)


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name`` / ``--name=`` in either spelling, else None."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, tok in enumerate(argv):
        opt, eq, val = tok.partition("=")
        if opt in spellings:
            return val if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _hub_preflight(argv: list[str]) -> None:
    """A hub model that cannot load fails in seconds, before any library retries for minutes."""
    from vlmfit.models import registry
    from vlmfit.report import preflight

    model = _flag(argv, "model") or ("smolvlm" if _flag(argv, "merge") is None else None)
    if model is None or model not in registry.names():
        return  # unknown names are reported by the command itself
    weights = _flag(argv, "weights") or "hub"
    problem, offline = preflight.hub_problem(model, weights, _flag(argv, "revision"))
    if problem:
        raise preflight.ParameterError(problem)
    if offline:
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read at import: the libraries see it from here on
        print(f"vlmfit: hub unreachable; using the cached {model} offline", file=sys.stderr)


# Our own errors read as sentences; anything else keeps its type name.
_OURS = {"ParameterError", "RunExistsError", "ConfigError", "NotebookFailed", "UnknownModelError"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
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
    wants_help = bool({"-h", "--help"} & set(rest))
    try:
        if name == "preprocess" and not wants_help:
            _hub_preflight(rest)
        with both_spellings():
            result = getattr(importlib.import_module(module), func)(rest)
    except SystemExit as e:
        if wants_help and name in {"tokens", "plan", "check", "preprocess"}:
            print("\n" + models_help())
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 0)
    except KeyboardInterrupt:
        print(f"vlmfit {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vlmfit ... | head`
        return 0
    except Exception as e:  # noqa: BLE001 - one line for people; VLMFIT_DEBUG=1 for the trace
        if os.environ.get("VLMFIT_DEBUG") == "1":
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        ours = type(e).__name__ in _OURS
        kind = "" if ours else f"{type(e).__name__}: "
        print(f"vlmfit {name}: error: {kind}{text}", file=sys.stderr)
        return 2 if ours else 1
    return int(result or 0)
