#!/bin/bash
# Run 8, host command (one nvidia-h200): SmolVLM mb12 end to end under worker / OpenMP settings
mkdir -p /tmp/site /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nproc; lscpu | grep -E "^Thread|^Core|^Socket|Model name"
CUDA_VISIBLE_DEVICES=0 VLMFIT_CACHE=/tmp/c0 timeout ${LIMIT:-400} python3 benchmarks/fastpath.py --suite run8-host --work /tmp/w0 --out /tmp/out/host > $OUT/host.log 2>&1
echo "rc=$?"
grep -E '^\{' $OUT/host.log | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['finetune'],r['mb'],r.get('over'),r.get('env'),'tok/s=%.0f'%r.get('tokens_per_s',0),'wall=%.0f'%r.get('tokens_per_s_wall',0) if r.get('tokens_per_s_wall') else '','peak=%.3f'%r.get('peak_gib',0),'wait=%s'%r.get('data_wait_fraction'),'workers=%s'%lv.get('dataloader_num_workers'),r.get('error',''),r.get('wall_s'))"
