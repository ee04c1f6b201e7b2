#!/bin/bash
# Run 7, command 2: packing and phase timing (7B, SmolVLM), and the GPU tests
mkdir -p /tmp/site /tmp/av /tmp/snap/shared/fixtures /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/v2/av.tar.xz -C /tmp/av & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cp -r .gpu/v2/llamafactory_mllm_demo /tmp/snap/shared/fixtures/
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
LIMIT=${LIMIT:-500}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 7b python3 benchmarks/fastpath.py --suite run7b-7b --work /tmp/w0 --out /tmp/out/7b
lane 1 smol python3 benchmarks/fastpath.py --suite run7b-smol --work /tmp/w1 --out /tmp/out/smol
PYTHONPATH=/tmp/site:/tmp/av:/tmp/snap/lib lane 2 tests bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k 'offload or host_emb or matches_the_plain'; python3 -m pytest -q -p no:cacheprovider tests/test_data_video.py; python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_bench_fastpath.py"
wait
for f in 7b smol; do echo "== $f"; grep -E '^\{|lane ' $OUT/$f.log | cut -c1-600; done
for f in 7b smol; do grep -E '^\{' $OUT/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l)
    if 'phases_s' in r: print(r['model'],r['path'],r['mb'],json.dumps({k:round(v,4) for k,v in r['phases_s'].items()}))"; done
echo "== tests"; grep -E "passed|failed|FAILED|Error|lane " $OUT/tests.log | tail -30
