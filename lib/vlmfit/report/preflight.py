"""Checks of a notebook launch before its kernel starts: parameters, model, data, run, hub.

Each mistake stops in one line (``ParameterError``), with a "did you mean" where one fits.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import Any

from vlmfit.train import runs

# Data the notebooks generate on demand (the bundled dataset): need not exist beforehand.
GENERATED_DATA = Path("data/shapes")
HUB_TIMEOUT_S = 5.0


class ParameterError(ValueError):
    """A launch that cannot run, found before the notebook starts."""


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
    """RunConfig's fields and the old names it still reads (config.RENAMED)."""
    from vlmfit.config import FIELDS, RENAMED

    return set(FIELDS) | set(RENAMED)


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


def check_model(name: str) -> None:
    from vlmfit.models import registry

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
    from vlmfit.models import registry

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
    model = params.get("model") or parse_value(str(known.get("model", {}).get("default")))
    if model is None:  # the notebook leaves it to RunConfig
        from vlmfit.config import RunConfig

        model = RunConfig.model
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
