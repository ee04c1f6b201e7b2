#!/bin/bash
mkdir -p /tmp/site /tmp/snap
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0 VLMFIT_CACHE=/tmp/c0 timeout 170 python3 benchmarks/fastpath.py --suite run7-smol-host --work /tmp/w0 --out /tmp/o > $OUT/smol.log 2>&1
echo "rc=$?"
grep -E '^\{' $OUT/smol.log | cut -c1-420
