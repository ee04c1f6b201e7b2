#!/bin/bash
# Run 9, prepared at the end of session 6 (not yet run): uint8_pixels end to end on the
# 16-core host of one nvidia-h200, against its GPU loop, with uint8_pixels off in the same
# command; then the GPU tests of the two levers added in session 6.
# Carry: .gpu/site.tar.xz (the lock's wheels) and .gpu/snap.tar.xz
#   (tar cJf .gpu/snap.tar.xz -C /tmp/snap lib benchmarks tests data, data/ = data/shapes only)
mkdir -p /tmp/site /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nproc
CUDA_VISIBLE_DEVICES=0 VLMFIT_CACHE=/tmp/c0 timeout ${LIMIT:-420} python3 benchmarks/fastpath.py --suite run9-host --work /tmp/w0 --out /tmp/out/host > $OUT/host.log 2>&1
echo "rc=$?"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pixels.py tests/test_syncfree.py > $OUT/tests.log 2>&1
grep -E '^\{' $OUT/host.log | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['finetune'],r['mb'],r.get('over'),'tok/s=%.0f'%(r.get('tokens_per_s') or 0),'peak=%.3f'%(r.get('peak_gib') or 0),'wait=%s'%r.get('data_wait_fraction'),'u8=%s'%lv.get('uint8_pixels'),r.get('error',''),r.get('wall_s'))"
grep -E "passed|failed|^E " $OUT/tests.log | tail -6
