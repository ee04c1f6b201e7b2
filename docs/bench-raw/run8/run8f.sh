#!/bin/bash
# Run 8, last command (nvidia-h200-x2): lane 0 SmolVLM against its GPU loop; lane 1 the 7B
# against its loop, the plain recipe, then Unsloth (same --out: one table)
mkdir -p /tmp/site /tmp/unsloth /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/unsloth.tar.xz -C /tmp/unsloth & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
LIMIT=${LIMIT:-430}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 smol python3 benchmarks/fastpath.py --suite run8-final-smol --work /tmp/w0 --out /tmp/out/smol
lane 1 7b bash -c "python3 benchmarks/fastpath.py --suite run8-final-7b --work /tmp/w1 --out /tmp/out/7b; UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth python3 benchmarks/unsloth_driver.py --suite run8-unsloth --work /tmp/w1 --out /tmp/out/7b"
wait
cp /tmp/out/7b/rows.jsonl $OUT/7b-rows.jsonl 2>/dev/null; cp /tmp/out/smol/rows.jsonl $OUT/smol-rows.jsonl 2>/dev/null
for f in smol 7b; do echo "== $f"; grep -E '^\{|lane ' $OUT/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
    if not l.startswith('{'): print(l.strip()); continue
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['model'],r['finetune'],r['mb'],r.get('over'),'tok/s=%.0f'%(r.get('tokens_per_s') or 0),'peak=%.3f'%(r.get('peak_gib') or 0),'wait=%s'%r.get('data_wait_fraction'),'sf=%s'%lv.get('sync_free'),'off=%s'%lv.get('activation_offloading'),r.get('error',''),r.get('wall_s'))"; done
grep -E "^\|" $OUT/7b.log | tail -8
