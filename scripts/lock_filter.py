"""Derive installs from requirements.lock, the one source of truth for pins.

    python scripts/lock_filter.py requirements.lock --torch cpu   > requirements-cpu.txt
    python scripts/lock_filter.py requirements.lock --environment-yml > environment.yml

--torch cpu drops the CUDA wheels (nvidia-*, triton) and torchvision (PyPI's build
does not import beside a local CPU torch build); torch itself keeps its pin and
comes from a local CPU wheel when pip has one (find-links). --torch cuda keeps all.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CUDA_ONLY = re.compile(r"^(nvidia-[\w-]+|triton|torchvision)==", re.IGNORECASE)


def pins(lock_text: str) -> list[str]:
    """The requirement lines of a lock (markers kept, comments and hashes dropped)."""
    out = []
    for line in lock_text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-", "\\")):
            out.append(line)
    return out


def filtered(lock_text: str, torch: str) -> list[str]:
    lines = pins(lock_text)
    if torch == "cpu":
        lines = [x for x in lines if not CUDA_ONLY.match(x)]
    return lines


def environment_yml(lock_text: str) -> str:
    """A conda environment whose pip section installs exactly the lock's pins."""
    body = "\n".join(f"      - {x}" for x in pins(lock_text))
    return (
        "# Generated from requirements.lock by `make lock`: do not edit by hand.\n"
        "# conda env create -f environment.yml && conda activate vlmfit && pip install --no-deps -e .\n"
        "name: vlmfit\n"
        "channels:\n  - conda-forge\n"
        "dependencies:\n  - python=3.11\n  - pip\n  - make\n  - pip:\n"
        f"{body}\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("lock")
    p.add_argument("--torch", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--environment-yml", action="store_true")
    a = p.parse_args(argv)
    text = Path(a.lock).read_text()
    if a.environment_yml:
        sys.stdout.write(environment_yml(text))
    else:
        sys.stdout.write("\n".join(filtered(text, a.torch)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
