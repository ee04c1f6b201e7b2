"""``vlmfit train``: SFT or DPO from the command line, with RunConfig field names.

    python -m vlmfit train --model tiny-smolvlm --method sft --finetune full \
        --data data/shapes/sft_train.json --eval_data data/shapes/sft_test.json
    python -m vlmfit train --merge RUN [--out FOLDER]
"""

from __future__ import annotations

import argparse
from typing import Any

from vlmfit.config import ConfigError, resolve
from vlmfit.train import distributed
from vlmfit.train.merge import merge_adapter
from vlmfit.train.pipeline import run


def cli_train(argv: list[str]) -> int:
    """``python -m vlmfit train --key value ...`` with RunConfig field names."""
    parser = argparse.ArgumentParser(prog="vlmfit train", description=__doc__)
    parser.add_argument("--merge", metavar="RUN", help="merge RUN's adapter into its base")
    parser.add_argument("--out", help="output folder for --merge")
    known, rest = parser.parse_known_args(argv)
    if known.merge:
        print(merge_adapter(known.merge, known.out or f"runs/{known.merge}/merged"))
        return 0
    overrides: dict[str, Any] = {}
    it = iter(rest)
    for tok in it:
        if not tok.startswith("--"):
            parser.error(f"unexpected argument {tok!r}")
        key, _, val = tok[2:].partition("=")
        overrides[key.replace("-", "_")] = val if _ else next(it)
    try:
        cfg, origin = resolve(overrides)
    except ConfigError as e:
        print(f"vlmfit train: configuration error: {e}")
        return 2
    summary = run(cfg, origin)
    if distributed.is_main():
        print({k: summary[k] for k in ("run", "global_step", "eval_before", "eval_after")})
    return 0
