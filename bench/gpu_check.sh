#!/usr/bin/env bash
# The CUDA path, run for real on a lent GPU (the `device` tool), as one short script:
#   1. tests/test_cuda.py: bf16 training step vs float32, the fit loop with a GPU state resumed,
#      bf16 embeddings vs the float32 CPU path (skipped on machines without CUDA, i.e. in CI);
#   2. bench/embed.py --quick --gpu-only: the production shape (d 256, 4 layers, 512 events) under
#      bf16 autocast against a bf16 matmul bound measured in the same rounds, its drift from float32,
#      and the whole embed job with device=cuda on 20,000 synthetic profiles;
#   3. the product's own jobs on a generated world with device=cuda: `fmpipe train` (product
#      defaults, wall-clock budget TRAIN_S), `fmpipe evaluate`, `fmpipe embed`.
# Inputs that cannot be made there travel with the call (`carry`): .whl/ (duckdb, missing from the
# GPU image) and .gpu/home (a world made here: `fmpipe generate profiles=20000 titles=3000 days=14`,
# `fmpipe tokenize date=2026-11-14 full=true`, raw/ and tokens/ removed). Outputs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
TRAIN_S=${TRAIN_S:-90}
DAY=2026-11-14
mkdir -p "$OUT"
TIMER=(); [ -x /usr/bin/time ] && TIMER=(/usr/bin/time -v)      # peak RSS where GNU time exists
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "commit ${COMMIT:-unknown}"; nproc; uptime; } 2>&1 | tee "$OUT/machine.txt"

echo "== 1. CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.log"

echo "== 2. embed bench (GPU only)"
python3 bench/embed.py --quick --gpu-only > "$OUT/embed_gpu.json" 2> "$OUT/embed_gpu.err"
tail -4 "$OUT/embed_gpu.err"; tail -c 600 "$OUT/embed_gpu.json"; echo

echo "== 3. product jobs on CUDA"
if [ -d .gpu/home ]; then
  export FMPIPE_HOME=$PWD/.gpu/home
  rm -rf "$FMPIPE_HOME/models" "$FMPIPE_HOME/embeddings" "$FMPIPE_HOME/reports"
  t=$SECONDS; "${TIMER[@]}" python3 -m jobs.cli train date=$DAY leave_one_out=true time_budget_s=$TRAIN_S clock=wall device=cuda \
    > "$OUT/train.json" 2> "$OUT/train.err"; echo "train rc=$? wall $((SECONDS - t)) s"
  tail -c 300 "$OUT/train.json"; grep -E "Maximum resident|Elapsed" "$OUT/train.err"
  python3 -m jobs.cli evaluate date=$DAY > "$OUT/evaluate.json" 2> "$OUT/evaluate.err"; echo "evaluate rc=$?"
  grep -E '"ndcg@10"|"hr@10"' "$OUT/evaluate.json" | head -4
  t=$SECONDS; "${TIMER[@]}" python3 -m jobs.cli embed date=$DAY device=cuda > "$OUT/embed_job.txt" 2> "$OUT/embed_job.err"
  echo "embed rc=$? wall $((SECONDS - t)) s"; grep -E "Elapsed|Maximum resident" "$OUT/embed_job.err"; tail -c 300 "$OUT/embed_job.txt"; echo
fi
