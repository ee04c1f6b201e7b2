"""``vlmfit train`` (SFT / DPO with RunConfig fields as flags), ``merge`` and ``launch``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from typing import Any

from vlmfit.cli.common import Parser, command, hub_preflight
from vlmfit.config import BY_METHOD, FIELDS, METHOD_DEFAULTS, RENAMED, RunConfig


def config_comments() -> dict[str, tuple[str, str]]:
    """``{field: (section, comment)}`` from RunConfig's source: the comment inside each
    field's statement (trailing, or inside its parentheses), the section from the last
    standalone comment line above it."""
    import ast
    import io
    import tokenize

    src, _ = inspect.getsourcelines(RunConfig)
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


def _default_text(f: dataclasses.Field) -> str:
    if f.default is BY_METHOD:
        return "default " + ", ".join(f"{m} {d[f.name]!r}" for m, d in METHOD_DEFAULTS.items())
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return f"default {f.default_factory()!r}"
    return f"default {f.default!r}"


def train_help() -> str:
    """``vlmfit train --help``: every RunConfig field with its default and meaning."""
    comments = config_comments()
    lines = [
        "usage: vlmfit train [--FIELD VALUE ...]",
        "",
        "SFT or DPO outside the notebooks, with vlmfit.config.RunConfig fields as flags",
        "(--max-steps or --max_steps; a true/false field alone means true). Writes",
        "runs/<run>/; an existing run is continued with --resume, replaced with --overwrite,",
        "else refused. A field left out takes RunConfig's default (some depend on --method).",
    ]
    section = None
    for f in dataclasses.fields(RunConfig):
        sec, meaning = comments.get(f.name, ("", ""))
        if sec != section:
            section = sec
            lines += ["", f"{sec or 'Fields'}:"]
        flag = f"--{f.name.replace('_', '-')}"
        lines.append(f"  {flag:32} {_default_text(f)}")
        if meaning:
            lines.append(f"  {'':32} {meaning}")
    old = ", ".join(
        f"--{o.replace('_', '-')} (now --{n.replace('_', '-')})" for o, n in RENAMED.items()
    )
    lines += ["", f"Old names, still read: {old}."]
    return "\n".join(lines)


def _typed(name: str):
    """An argparse ``type`` that turns a flag's text into the field's type."""
    from vlmfit.config import ConfigError, _coerce

    field = RENAMED.get(name, name)

    def convert(text: str) -> Any:
        try:
            return _coerce(field, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    convert.__name__ = field
    return convert


def train_parser(command: str = "train") -> Parser:
    p = Parser(
        command, add_help=False, usage=f"vlmfit {command} [--FIELD VALUE ...] (--help: the fields)"
    )
    p.add_argument("-h", "--help", action="store_true")
    types = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    for name in [*types, *RENAMED]:
        flag = f"--{name.replace('_', '-')}"
        boolean = types[RENAMED.get(name, name)].startswith("bool")
        p.add_argument(flag, dest=name, type=_typed(name), default=argparse.SUPPRESS,
                       nargs="?" if boolean else None, const=True if boolean else None)  # fmt: skip
    return p


def train_overrides(argv: list[str], p: Parser | None = None) -> dict[str, Any]:
    """The RunConfig overrides in ``argv`` (only the flags given); unknown flags: exit 2."""
    from vlmfit.report.preflight import did_you_mean

    p = p or train_parser()
    args, rest = p.parse_known_args(argv)
    if rest:
        dashed = {"--" + f.replace("_", "-") for f in FIELDS}
        flag = rest[0].partition("=")[0]
        if not flag.startswith("--"):
            p.error(f"unexpected argument {flag!r} (train flags are --FIELD VALUE)")
        p.error(f"unknown vlmfit train option {flag}{did_you_mean(flag, dashed)}")
    out = vars(args)
    out.pop("help", None)
    return out


@command("train")
def cli_train(argv: list[str]) -> int:
    """``vlmfit train --FIELD VALUE ...``: run protection and the hub first, then the run."""
    from vlmfit.config import resolve
    from vlmfit.train import runs

    p = train_parser()
    if {"-h", "--help"} & set(argv):
        print(train_help())
        return 0
    cfg, origin = resolve(train_overrides(argv, p))
    # Refuse an existing run here; with --overwrite, train.run replaces it once it starts.
    runs.check_run_dir(
        runs.run_dir(cfg.runs_dir, cfg.run_id), resume=cfg.resume, overwrite=cfg.overwrite
    )
    hub_preflight(cfg.model, cfg.weights, cfg.revision)  # the network last
    from vlmfit.train import distributed
    from vlmfit.train.pipeline import run

    summary = run(cfg, origin)
    if distributed.is_main():
        print({k: summary[k] for k in ("run", "global_step", "eval_before", "eval_after")})
    return 0


@command("config")
def cli_config(argv: list[str]) -> int:
    """``vlmfit config [--FIELD VALUE ...] [--get FIELD]``: the RunConfig these flags give."""
    import json

    from vlmfit.config import _coerce, upgrade

    p = train_parser("config")
    p.add_argument("--get", metavar="FIELD", choices=sorted(FIELDS), help="print one field")
    if {"-h", "--help"} & set(argv):
        print(
            "usage: vlmfit config [--FIELD VALUE ...] [--get FIELD]\n\n"
            "The RunConfig that `vlmfit train` with these flags would use, as JSON (defaults\n"
            "filled in, not validated); --get FIELD prints that field alone (None: empty).\n"
            "The fields: vlmfit train --help."
        )
        return 0
    overrides = train_overrides(argv, p)
    get = overrides.pop("get", None)
    values = upgrade(overrides)
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if get:
        value = getattr(cfg, get)
        print("" if value is None else value)
    else:
        print(json.dumps(cfg.to_dict(), indent=1))
    return 0


@command("merge")
def cli_merge(argv: list[str]) -> int:
    """``vlmfit merge RUN [--out FOLDER]``: the run's LoRA adapter merged into its base."""
    p = Parser("merge", "Merge RUN's LoRA adapter into its base model, for export.")
    p.add_argument("run", help="run id (runs/RUN) or run folder")
    p.add_argument("--out", help="where to write (default runs/RUN/merged)")
    p.add_argument("--runs-dir", default=RunConfig.runs_dir, help="folder of run folders")
    a = p.parse_args(argv)
    from vlmfit.train.merge import merge_adapter

    print(merge_adapter(a.run, a.out or f"{a.runs_dir}/{a.run}/merged", runs_dir=a.runs_dir))
    return 0


@command("launch")
def cli_launch(argv: list[str]) -> int:
    """``vlmfit launch --nproc N [--dist ddp] -- TRAIN FLAGS``: train under accelerate."""
    import os
    import shlex

    from vlmfit.train import distributed

    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    p = Parser(
        "launch",
        "vlmfit train on several processes through accelerate launch (arguments after -- "
        "are vlmfit train's: --model ... --finetune ...). Everything is checked once, "
        "before any process starts.",
    )
    p.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this machine")
    p.add_argument("--dist", default="ddp", choices=list(distributed.ENGINES),
                   help="engine: accelerate/DIST.yaml (default ddp)")  # fmt: skip
    p.add_argument("--nnodes", type=int, default=1, help="machines (the same command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    p.add_argument("--main-address", help="address of machine 0 (multi-node)")
    p.add_argument("--main-port", type=int, help="a free port on machine 0 (multi-node)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--dry-run", action="store_true", help="print the launch line, run nothing")
    a = p.parse_args(argv)
    if a.nnodes > 1 and not a.main_address:
        p.error("--nnodes > 1 needs --main-address (machine 0's address, reachable from all)")
    overrides = train_overrides(train_args)
    distributed.check_engine(a.dist, a.nproc)
    ranks_args = distributed.prepare(
        overrides, train_args, overwrite=a.overwrite, node_rank=a.node_rank, dist=a.dist
    )
    cmd = distributed.launch_command(
        ranks_args,
        nproc=a.nproc,
        dist=a.dist,
        nnodes=a.nnodes,
        node_rank=a.node_rank,
        main_address=a.main_address,
        main_port=a.main_port,
    )
    print(">> " + shlex.join(cmd), flush=True)
    if a.dry_run:
        return 0
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # accelerate owns the processes (and Ctrl-C) from here
    return 0
