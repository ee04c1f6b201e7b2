#!/usr/bin/env bash
# Build .gpu/unsloth.tar.xz: Unsloth 2026.10.9 and what it needs beyond the GPU machine's
# image, as unpacked wheels in one xz tarball (about 12 MB), for benchmarks/fastpath.py's
# Unsloth rows (benchmarks/unsloth_driver.py).
#
#     bash scripts/build_unsloth_carry.sh            # here, with internet (PyPI)
#
# Unsloth pins transformers <= 5.17, trl <= 1.15 and datasets < 5, which clash with
# vlmfit's lock, so it runs in its own environment: the GPU machine's python3 (Python 3.12,
# torch 2.11+cu130, transformers 5.17, peft, accelerate, pandas, pyarrow, fsspec, xxhash,
# einops, torchvision, triton ... preinstalled; no internet) with this folder, and ONLY
# this folder, on PYTHONPATH (vlmfit's own carry, .gpu/site.tar.xz, holds transformers
# 5.23 and must not be on that path). On the GPU machine:
#
#     mkdir -p /tmp/unsloth && tar xJf .gpu/unsloth.tar.xz -C /tmp/unsloth
#     UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth python3 benchmarks/fastpath.py ...
#
# The list is the one in shared/reference/probes/README.md (the probes that measured
# Unsloth there): unsloth (its studio/ and unsloth_cli/ folders removed: 28 MB of web
# assets), unsloth_zoo, trl 1.15.0, datasets 4.8.5, dill, multiprocess, bitsandbytes
# (only libbitsandbytes_cuda130.so kept: the host's CUDA), tyro, docstring_parser,
# typeguard, shtab, msgspec, cut_cross_entropy, torchao (its stray top-level test/ folder
# removed), hf_transfer, json5, structlog, nest_asyncio. Versions are pinned to what
# satisfies unsloth's and unsloth_zoo's Requires-Dist (checked 2026-11-29): unsloth_zoo
# >= 2026.10.9 (the newest is that one), datasets' dill < 0.4.2 and multiprocess < 0.70.20.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.gpu/unsloth.tar.xz}
[ -x "$PY" ] || PY=python3

PKGS=(
  unsloth==2026.10.9
  unsloth_zoo==2026.10.9
  trl==1.15.0
  datasets==4.8.5
  dill==0.4.1
  multiprocess==0.70.19
  bitsandbytes==0.50.2
  tyro==1.0.17
  docstring_parser==0.18.0
  typeguard==4.6.1
  shtab==1.13.0
  msgspec==0.23.0
  cut_cross_entropy==25.1.1
  torchao==0.18.0
  hf_transfer==0.1.9
  json5==0.17.3
  structlog==26.1.0
  nest_asyncio==1.6.0
)
# pip matches each manylinux tag exactly: list the ones these wheels use; pure wheels
# (py3-none-any) match any platform.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 any)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels="$work/wheels" site="$work/site"
mkdir -p "$wheels" "$site" "$(dirname "$OUT")"

args=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$wheels")
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
for pkg in "${PKGS[@]}"; do
  "$PY" -m pip "${args[@]}" -q "$pkg" || {
    echo "build_unsloth_carry: no Python 3.12 x86-64 wheel of $pkg (platforms: ${PLATFORMS[*]})" >&2
    exit 1
  }
done

n=0
for whl in "$wheels"/*.whl; do
  "$PY" -m zipfile -e "$whl" "$site"
  n=$((n + 1))
done
[ "$n" -eq "${#PKGS[@]}" ] || {
  echo "build_unsloth_carry: expected ${#PKGS[@]} wheels, got $n" >&2
  exit 1
}

# Trim what never runs there.
rm -rf "$site/studio" "$site/unsloth_cli" "$site/test"
find "$site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name libbitsandbytes_cuda130.so -delete
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
for must in unsloth/__init__.py unsloth_zoo/__init__.py trl/__init__.py datasets/__init__.py \
  bitsandbytes/libbitsandbytes_cuda130.so; do
  [ -e "$site/$must" ] || {
    echo "build_unsloth_carry: $must missing from the unpacked wheels" >&2
    exit 1
  }
done

tar c -C "$site" . | xz -T2 -6 >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT: $(du -h "$OUT" | cut -f1) ($n wheels, $(du -sh "$site" | cut -f1) unpacked)"
