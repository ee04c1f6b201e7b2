#!/bin/bash
# Run 8, command N (nvidia-h200-x2): lane 0 measures SmolVLM mb12 end to end with and without
# sync_free next to its GPU loop; lane 1 traces the same cases, then the GPU tests.
mkdir -p /tmp/site /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-420}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 smol python3 benchmarks/fastpath.py --suite run8-smol --work /tmp/w0 --out /tmp/out/smol
lane 1 trace bash -c "python3 benchmarks/fastpath.py --suite run8-trace --work /tmp/w1 --out /tmp/out/trace; python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_syncfree.py tests/test_bench_fastpath.py"
wait
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
python3 -c "import torch,transformers,trl,peft;print(torch.__version__,transformers.__version__,trl.__version__,peft.__version__)"
for f in smol trace; do echo "== $f"; grep -E '^\{|lane ' $OUT/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
    if not l.startswith('{'): print(l.strip()); continue
    r=json.loads(l)
    if 'path' not in r: print(l.strip()); continue
    lv=r.get('levers',{})
    print(r['path'],r['finetune'],r['mb'],r.get('over'),'tok/s=%.0f'%r.get('tokens_per_s',0),'peak=%.3f'%r.get('peak_gib',0),'wait=%s'%r.get('data_wait_fraction'),'sf=%s'%lv.get('sync_free'),r.get('error',''))
    if 'trace' in r: print('   BUSY', r['trace'].get('gpu_busy'), r['trace'].get('window_ms'), r['trace'].get('idle_ms_in_long_gaps')); print('   TRACE', json.dumps(r['trace'].get('longest_gaps'))[:5000])"; done
echo "== tests"; grep -E "passed|failed|^E |Error" $OUT/trace.log | tail -12
