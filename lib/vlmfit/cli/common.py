"""What every command shares: the parser class, sizes, the models list, the hub check."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse for every command: ``--max-steps`` and ``--max_steps`` both work; a usage
    error prints the usage and one ``error:`` line on stderr and exits 2 (argparse's own)."""

    def __init__(self, command: str, description: str | None = None, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=f"vlmfit {command}", description=description, **kw)

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
        return super().parse_known_args(fixed, namespace)


def image_size(text: str) -> tuple[int, int]:
    """``--image WIDTHxHEIGHT`` as an argparse ``type``."""
    try:
        w, h = (int(p) for p in text.lower().split("x"))
    except ValueError:
        msg = f"expected WIDTHxHEIGHT (e.g. 1000x1000), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"sides must be >= 1 px, got {text!r}")
    return w, h


def models_help() -> str:
    """The registry's models, for the epilog of the commands that take ``--model``."""
    from vlmfit.models import registry

    rows = [
        f"  {n:18} {'offline tiny model' if m.tiny else m.hub_id}"
        + (f" ({m.params_b:g}B)" if m.params_b else "")
        for n, m in registry.MODELS.items()
    ]
    return "models (--model):\n" + "\n".join(rows)


def hub_preflight(model: str | None, weights: str | None, revision: str | None) -> None:
    """A hub model that cannot load fails in seconds, before any library retries for minutes."""
    from vlmfit.models import registry
    from vlmfit.report import preflight

    if model is None or model not in registry.names():
        return  # unknown names are reported by the command itself
    problem, offline = preflight.hub_problem(model, weights or "hub", revision)
    if problem:
        raise preflight.ParameterError(problem)
    if offline:
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read at import: the libraries see it from here on
        print(f"vlmfit: hub unreachable; using the cached {model} offline", file=sys.stderr)


# Our own errors read as sentences, exit 2: the launch was wrong, nothing ran.
USAGE_ERRORS = {
    "ParameterError",
    "RunExistsError",
    "ConfigError",
    "UnknownModelError",
    "LaunchError",
    "WontFitError",
}
# Our own errors after the work started: a sentence, exit 1.
FAILURES = {"NotebookFailed"}


def command(name: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """``vlmfit NAME``'s function, ``argv -> exit status``, however it is called: usage
    errors 2 (argparse's, and ours), failures 1, each one line on stderr without a traceback
    (``VLMFIT_DEBUG=1`` shows it for errors not ours); warnings one line."""

    def wrap(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(fn)
        def run(argv: list[str]) -> int:
            try:
                with warnings.catch_warnings():
                    warnings.showwarning = lambda message, category, *_a, **_k: print(
                        f"vlmfit {name}: {category.__name__}: {message}", file=sys.stderr
                    )
                    return int(fn(list(argv)) or 0)
            except SystemExit as e:  # argparse: a usage error (2) or --help (0)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                    return 2
                return int(e.code or 0)
            except KeyboardInterrupt:
                print(f"vlmfit {name}: interrupted", file=sys.stderr)
                return 130
            except BrokenPipeError:  # `vlmfit ... | head`
                return 0
            except Exception as e:  # noqa: BLE001 - one line for people
                kind = type(e).__name__
                ours = kind in USAGE_ERRORS | FAILURES
                if os.environ.get("VLMFIT_DEBUG") == "1" and not ours:
                    raise
                text = str(e).strip() if ours else (str(e).strip().splitlines() or [""])[0]
                print(f"vlmfit {name}: error: {'' if ours else kind + ': '}{text}", file=sys.stderr)
                return 2 if kind in USAGE_ERRORS else 1

        return run

    return wrap
