#!/usr/bin/env bash
# Build the vlmfit image for real and test inside it, without Docker.
#
# Usage:  scripts/container_test.sh                      (CPU torch; runs as root)
#         TORCH_VARIANT=cuda scripts/container_test.sh    (the GPU image: CUDA torch wheels)
#
# What it does, with the time of each phase:
#   1. tools   installs buildah + debootstrap with apt if absent
#   2. base    debootstrap Debian bookworm (minbase + ca-certificates) into
#              $CACHE_DIR, tars it, imports it as localhost/vlmfit-base:bookworm
#              (reused while the tarball is newer than this script)
#   3. build   buildah bud of ./Dockerfile with TORCH_VARIANT (cpu: the local
#              torch CPU wheel dir mounted as find-links; cuda: the lock as is,
#              torch + nvidia-* wheels from PyPI), the host CA for pip
#   4. test    in a working container, as the image's non-root user: uid != 0,
#              imports, installed versions == requirements.lock pins, (cuda) torch
#              loads its CUDA runtime, cuBLAS and cuDNN, a smoke pytest, then
#              $CONTAINER_TEST_CMD (default: make test-fast)
# The image's size and each phase's time are written to $CACHE_DIR/<variant>-record.txt.
#
# Environment (all optional):
#   STORAGE_DRIVER      buildah storage driver (default: overlay if it works, else vfs)
#   CACHE_DIR           base rootfs cache (default: build/container)
#   TORCH_VARIANT       cpu (default) | cuda
#   IMAGE               image tag to build (default: localhost/vlmfit:test, cuda: localhost/vlmfit:cuda)
#   WHEELS_DIR          host dir with torch-2.13.0+cpu wheel (default: /opt/wheels; cpu only)
#   HOST_CA             CA bundle pip must trust (default: /etc/ssl/certs/ca-certificates.crt)
#   TORCH_CPU_INDEX     extra index for CPU torch inside the build (default: empty = none)
#   DEBIAN_MIRROR       default: http://deb.debian.org/debian
#   CONTAINER_TEST_CMD  command run in the image's WORKDIR as the non-root user
#   NO_CACHE=1          rebuild every layer (buildah bud --no-cache)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/container_test.sh"
cd "$ROOT"

CACHE_DIR="${CACHE_DIR:-$ROOT/build/container}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
case "$TORCH_VARIANT" in
    cpu) IMAGE="${IMAGE:-localhost/vlmfit:test}" ;;
    cuda) IMAGE="${IMAGE:-localhost/vlmfit:cuda}" ;;
    *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2 ;;
esac
BASE_IMAGE="localhost/vlmfit-base:bookworm"
WHEELS_DIR="${WHEELS_DIR:-/opt/wheels}"
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Prefer the lead's Makefile target; fall back to pytest directly until it exists
# (exit 5 = "no tests collected" is tolerated only in that fallback).
CONTAINER_TEST_CMD="${CONTAINER_TEST_CMD:-if [ -f Makefile ] && make -n test-fast >/dev/null 2>&1; then make test-fast; else python -m pytest -q -m 'not slow and not gpu' tests || [ \$? -eq 5 ]; fi}"

T0=$(date +%s)
PHASES=()
phase_start() { PHASE="$1"; PT=$(date +%s); echo; echo "==> [$PHASE] $2"; }
phase_end() { local d=$(( $(date +%s) - PT )); PHASES+=("$(printf '%-6s %4ss' "$PHASE" "$d")"); echo "<== [$PHASE] ${d}s"; }

if [ "$(id -u)" -ne 0 ]; then echo "run as root (buildah chroot isolation, debootstrap)" >&2; exit 1; fi

# ---------------------------------------------------------------- 1. tools
phase_start tools "buildah + debootstrap"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        buildah debootstrap ca-certificates tar >/dev/null
fi
buildah --version
if [ -z "${STORAGE_DRIVER:-}" ]; then
    # overlay (native diff) is much faster than vfs, which copies the whole
    # rootfs for every layer; fall back to vfs where overlay cannot mount.
    if buildah --storage-driver overlay images >/dev/null 2>&1 \
        && ctr=$(buildah --storage-driver overlay from scratch 2>/dev/null) \
        && buildah --storage-driver overlay mount "$ctr" >/dev/null 2>&1; then
        STORAGE_DRIVER=overlay
    else
        STORAGE_DRIVER=vfs
    fi
    [ -n "${ctr:-}" ] && buildah --storage-driver overlay rm "$ctr" >/dev/null 2>&1 || true
fi
export STORAGE_DRIVER
echo "storage driver: $STORAGE_DRIVER"
B=(buildah --storage-driver "$STORAGE_DRIVER")
phase_end

CTR=""
cleanup() {
    local rc=$?
    if [ -n "$CTR" ]; then "${B[@]}" rm "$CTR" >/dev/null 2>&1 || true; fi
    if [ "$rc" -ne 0 ]; then
        echo "== container_test FAILED (rc=$rc) in phase [$PHASE] after $(( $(date +%s) - T0 ))s =="
        [ "${#PHASES[@]}" -gt 0 ] && printf '  %s\n' "${PHASES[@]}"
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- 2. base
phase_start base "Debian bookworm rootfs -> $BASE_IMAGE"
mkdir -p "$CACHE_DIR"
TARBALL="$CACHE_DIR/bookworm-rootfs.tar"
if [ -f "$TARBALL" ] && [ "$TARBALL" -nt "$SCRIPT" ]; then
    echo "reusing $TARBALL"
else
    rm -rf "$CACHE_DIR/rootfs" "$TARBALL"
    # minbase + ca-certificates: apt can then fetch python3 etc. in the
    # Dockerfile exactly as on the Ubuntu/CUDA base.
    debootstrap --variant=minbase --include=ca-certificates \
        bookworm "$CACHE_DIR/rootfs" "$DEBIAN_MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -30 "$CACHE_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$CACHE_DIR/rootfs/var/cache/apt/archives/"*.deb "$CACHE_DIR/rootfs/var/lib/apt/lists/"*
    tar -C "$CACHE_DIR/rootfs" --numeric-owner -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"   # only a finished tarball counts as cache
    rm -rf "$CACHE_DIR/rootfs"
fi
# Re-import only when the tarball changed (its mtime is recorded in a label).
STAMP="$(stat -c %Y "$TARBALL")"
if [ "$("${B[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "vlmfit.rootfs"}}' "$BASE_IMAGE" 2>/dev/null || true)" != "$STAMP" ]; then
    bctr=$("${B[@]}" from scratch)
    "${B[@]}" add "$bctr" "$TARBALL" /
    "${B[@]}" config --label "vlmfit.rootfs=$STAMP" \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$bctr"
    "${B[@]}" commit -q --rm "$bctr" "$BASE_IMAGE"
else
    echo "reusing image $BASE_IMAGE"
fi
phase_end

# ---------------------------------------------------------------- 3. build
phase_start build "buildah bud -> $IMAGE (TORCH_VARIANT=$TORCH_VARIANT)"
BUD=("${B[@]}" bud --isolation chroot --network host --layers
     --build-arg "BASE_IMAGE=$BASE_IMAGE"
     --build-arg "TORCH_VARIANT=$TORCH_VARIANT"
     --build-arg "TORCH_CPU_INDEX=$TORCH_CPU_INDEX"
     -f Dockerfile -t "$IMAGE")
# CPU only: a local find-links dir would offer torch 2.13.0+cpu, which pip prefers to
# PyPI's CUDA 2.13.0 (a local label sorts higher), so the CUDA build never sees it.
if [ "$TORCH_VARIANT" = cpu ] && [ -d "$WHEELS_DIR" ]; then
    BUD+=(-v "$WHEELS_DIR:/run/host-wheels:ro" --build-arg WHEELS_DIR=/run/host-wheels)
fi
if [ -f "$HOST_CA" ]; then
    BUD+=(-v "$HOST_CA:/run/host-ca.crt:ro" --build-arg HOST_CA=/run/host-ca.crt)
fi
[ "${NO_CACHE:-0}" = 1 ] && BUD+=(--no-cache)
"${BUD[@]}" .
"${B[@]}" images "$IMAGE"
phase_end

# ---------------------------------------------------------------- 4. test
phase_start test "checks inside $IMAGE as its non-root user"
CTR=$("${B[@]}" from --pull-never "$IMAGE")
WORKDIR=$("${B[@]}" inspect --format '{{.OCIv1.Config.WorkingDir}}' "$IMAGE")
RUNUSER=$("${B[@]}" inspect --format '{{.OCIv1.Config.User}}' "$IMAGE")
[ -n "$RUNUSER" ] || { echo "FAIL: image has no USER" >&2; exit 1; }
run_in() { "${B[@]}" run --isolation chroot --network host --user "$RUNUSER" --workingdir "$WORKDIR" "$CTR" -- "$@"; }

cat >"$CACHE_DIR/check_lock.py" <<'PY'
"""Installed distributions == the pins of requirements.lock that apply here.

Uses the repo's scripts/lock_filter.py (the filter the Dockerfile installed with)
and evaluates each pin's environment marker in the image's interpreter.
"""
import sys
from importlib.metadata import distributions
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, "scripts")
from lock_filter import filtered  # noqa: E402

lock, variant = sys.argv[1], sys.argv[2]
want = {}
for line in filtered(open(lock).read(), variant):
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate():
        (spec,) = req.specifier
        want[canonicalize_name(req.name)] = spec.version
have = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
bad = []
for name, ver in sorted(want.items()):
    got = have.get(name)
    # CPU torch carries a local label (2.13.0+cpu) that the `==2.13.0` pin matches
    ok = got is not None and Version(got).public == Version(ver).public
    if ok and Version(got).local and not (variant == "cpu" and name == "torch"):
        ok = False
    if not ok:
        bad.append(f"{name}: lock {ver}, installed {got}")
extra = sorted(set(have) - set(want) - {"pip", "vlmfit"})
bad += [f"{n}: installed {have[n]} but not in the lock" for n in extra]
print(f"{len(want)} lock pins apply here ({variant}); {len(have)} distributions installed")
if bad:
    print("MISMATCH:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("all equal to the lock")
PY
cat >"$CACHE_DIR/test_smoke_image.py" <<'PY'
"""Smoke test of the image itself (lives in /tmp of the test container, not in the repo)."""
import os


def test_env():
    assert os.getuid() != 0
    assert os.environ["VLMFIT_IN_CONTAINER"] == "1"
    assert os.access(os.getcwd(), os.W_OK)
    assert os.access(os.environ["HF_HOME"], os.W_OK)


def test_torch_cpu_math():
    import torch
    x = torch.ones(2, 3)
    assert (x @ x.T).sum().item() == 12.0
    assert not torch.cuda.is_available()


def test_pillow_and_pyav_roundtrip(tmp_path):
    import av
    import numpy as np
    from PIL import Image
    path = str(tmp_path / "t.mp4")
    with av.open(path, "w") as out:
        s = out.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            img = Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8))
            for p in s.encode(av.VideoFrame.from_image(img)):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with av.open(path) as inp:
        assert sum(1 for _ in inp.decode(video=0)) == 5


def test_imports():
    import datasets, papermill, peft, transformers, trl, vlmfit  # noqa: F401
PY
"${B[@]}" copy --chmod 0644 "$CTR" "$CACHE_DIR/check_lock.py" "$CACHE_DIR/test_smoke_image.py" /tmp/

echo "-- id"; run_in id
uid=$(run_in id -u)
[ "$uid" != 0 ] || { echo "FAIL: runs as root" >&2; exit 1; }
echo "-- imports"
run_in python -c "import vlmfit, torch, transformers, trl, peft, datasets, PIL, av, papermill; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
echo "-- versions vs requirements.lock"
run_in python /tmp/check_lock.py requirements.lock "$(run_in cat /opt/venv/TORCH_VARIANT)"
run_in pip check
if [ "$TORCH_VARIANT" = cuda ]; then
    echo "-- CUDA torch: its CUDA runtime, cuBLAS and cuDNN load (no GPU here, so no kernels run)"
    run_in python -c "
import ctypes, torch
assert torch.version.cuda, 'torch without CUDA: ' + torch.__version__
assert torch.backends.cudnn.is_available() and torch.backends.cudnn.version(), 'cuDNN missing'
ctypes.CDLL('libcublas.so.13')
maps = open('/proc/self/maps').read()
libs = sorted({l.rsplit('/', 1)[-1] for l in maps.splitlines() if '/nvidia/' in l and '.so' in l})
need = ('libcudart', 'libcublas', 'libcudnn')
missing = [n for n in need if not any(x.startswith(n) for x in libs)]
assert not missing, f'not loaded: {missing}; loaded: {libs}'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(),
      '| cuda.is_available():', torch.cuda.is_available(), '(no GPU or driver in this build host)')
print('loaded:', ' '.join(libs))
"
fi
echo "-- venv is read-only for the runtime user"
if run_in sh -c 'test -w /opt/venv/lib' 2>/dev/null; then echo "FAIL: /opt/venv writable by $RUNUSER" >&2; exit 1; fi
echo "-- smoke pytest"
run_in python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning --rootdir /tmp /tmp/test_smoke_image.py
echo "-- CONTAINER_TEST_CMD: $CONTAINER_TEST_CMD"
# The peer fixtures (../shared beside the checkout) are mounted read-only beside the repo in
# the image, where the tests look for them, so the data-format tests run there too.
SHARED_DIR="$(dirname "$ROOT")/shared"
if [ -d "$SHARED_DIR/fixtures" ]; then
  "${B[@]}" run --isolation chroot --network host --user "$RUNUSER" --workingdir "$WORKDIR" \
    --volume "$SHARED_DIR:$(dirname "$WORKDIR")/shared:ro" "$CTR" -- bash -c "$CONTAINER_TEST_CMD"
else
  run_in bash -c "$CONTAINER_TEST_CMD"
fi
phase_end

{
    echo "image $IMAGE (TORCH_VARIANT=$TORCH_VARIANT, base $BASE_IMAGE, storage $STORAGE_DRIVER)"
    echo "built and tested $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores"
    "${B[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
    printf '%s\n' "${PHASES[@]}"
    echo "total  $(( $(date +%s) - T0 ))s"
} | tee "$CACHE_DIR/$TORCH_VARIANT-record.txt.tmp"
mv "$CACHE_DIR/$TORCH_VARIANT-record.txt.tmp" "$CACHE_DIR/$TORCH_VARIANT-record.txt"
echo
echo "== container_test OK ($TORCH_VARIANT, $STORAGE_DRIVER) =="
