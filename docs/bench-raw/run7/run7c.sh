#!/bin/bash
# Run 7, command 3: every default against the plain recipe and Unsloth, one GPU a lane
mkdir -p /tmp/site /tmp/unsloth /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/unsloth.tar.xz -C /tmp/unsloth & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
LIMIT=${LIMIT:-480}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 7b python3 benchmarks/fastpath.py --suite run7-final-7b --work /tmp/w0 --out /tmp/out/7b
UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth lane 1 unsloth python3 benchmarks/unsloth_driver.py --suite run7-unsloth --work /tmp/w1 --out /tmp/out/u
lane 2 q python3 benchmarks/fastpath.py --suite run7-final-q --work /tmp/w2 --out /tmp/out/q
lane 3 smol bash -c "python3 benchmarks/fastpath.py --suite run7-final-smol --work /tmp/w3 --out /tmp/out/smol; python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k 'offload or host_emb'"
wait
for f in 7b q smol unsloth; do echo "== $f"; grep -E '^\{|lane |passed|failed' $OUT/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
    if not l.startswith('{'): print(l.strip()); continue
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['model'],r['finetune'],r['mb'],'tok/s=%.0f'%r['tokens_per_s'],'peak=%.3f'%r['peak_gib'],'res=%.2f'%r['reserved_gib'],'wait=%s'%r.get('data_wait_fraction'),'off=%s'%lv.get('activation_offloading'),'pack=%s'%lv.get('packing'),'emb=%s'%lv.get('host_embeddings_gib'),r.get('error',''))"; done
