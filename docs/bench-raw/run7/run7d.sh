#!/bin/bash
mkdir -p /tmp/site /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-250}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 dpo python3 benchmarks/fastpath.py --suite run7-final-dpo --work /tmp/w0 --out /tmp/out/dpo
lane 1 smol python3 benchmarks/fastpath.py --suite run7-final-smol11 --work /tmp/w1 --out /tmp/out/smol
lane 2 tests python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k 'offload or host_emb'
wait
for f in dpo smol; do echo "== $f"; grep -E '^\{|lane ' $OUT/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
    if not l.startswith('{'): print(l.strip()); continue
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['model'],r['finetune'],r['mb'],'tok/s=%.0f'%r.get('tokens_per_s',0),'peak=%.3f'%r.get('peak_gib',0),'res=%.2f'%r.get('reserved_gib',0),'wait=%s'%r.get('data_wait_fraction'),'off=%s'%lv.get('activation_offloading'),'pack=%s'%lv.get('packing'),'emb=%s'%lv.get('host_embeddings_gib'),r.get('error',''))"; done
echo "== tests"; grep -E "passed|failed|^E " $OUT/tests.log | tail -8
