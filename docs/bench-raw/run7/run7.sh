#!/bin/bash
# Run 7, command 1: four lanes, one GPU each (see benchmarks/fastpath.py SUITES["run7-*"])
mkdir -p /tmp/site /tmp/unsloth /tmp/snap /tmp/out
tar xJf .gpu/site.tar.xz -C /tmp/site & tar xJf .gpu/unsloth.tar.xz -C /tmp/unsloth & tar xJf .gpu/snap.tar.xz -C /tmp/snap & wait
cd /tmp/snap
export PYTHONPATH=/tmp/site:/tmp/snap/lib HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L; nproc; python3 -c "import torch,transformers,peft,trl;print(torch.__version__,transformers.__version__,peft.__version__,trl.__version__)"
LIMIT=${LIMIT:-540}
lane() { gpu=$1; name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu VLMFIT_CACHE=/tmp/c$gpu timeout $LIMIT "$@" --work /tmp/w$gpu --out /tmp/out/$name > $OUT/$name.log 2>&1
    echo "lane $name rc=$? at $(date +%T)" >> $OUT/$name.log ) & }
lane 0 7b python3 benchmarks/fastpath.py --suite run7-7b
UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth lane 1 unsloth python3 benchmarks/unsloth_driver.py --suite run7-unsloth
lane 2 q python3 benchmarks/fastpath.py --suite run7-7b-q
lane 3 smol python3 benchmarks/fastpath.py --suite run7-smol
wait
cp /tmp/out/unsloth/rows.jsonl $OUT/unsloth-rows.jsonl 2>/dev/null
for f in 7b q smol unsloth; do echo "== $f"; grep -E '^\{|lane ' $OUT/$f.log | cut -c1-900; done
