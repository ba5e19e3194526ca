#!/usr/bin/env bash
# Every issue-12 measurement in one call, ours and the paper code's side by side.
#
# On the lent H200 (one `run` call; carry .whl, which holds ml_collections and
# guided-diffusion-sdk, absent from that image):
#   run(command="bash bench/gpu_all.sh", carry=[".whl"], timeout_s=600)
# Here on the CPU (tiny configs, same code paths):
#   bash bench/gpu_all.sh --tiny
# Prepare .whl once here (pure-Python wheels; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl ml_collections==1.1.0
#   python3 -m pip wheel --no-deps -w .whl guided-diffusion-sdk==1.0.0
#
# Writes $OUT (default bench/out/) *.json and *.log and prints each part's table.
# Expected seconds on an H200 (compiles included; budget ~510 s of the call's 600):
#   install wheels 5 | imagenet128 ours (train b64, forward, guided, 250-step loop x2
#   batches, b64) ~150 | imagenet128 paper eager fp16 ~40 | imagenet256 ours (train b32,
#   forward, guided, 25-step loop x2, b64) ~170 | imagenet256 paper eager fp16 ~50 |
#   Inception 4096 images at 256, HIGHEST + DEFAULT ~60 | input pipeline 16 threads ~25.
# Not in this call (each a second call if time is left): the 250-step imagenet256 loop
# (LOOP256=250, ~+250 s), torch.compile of the paper code (PAPER=eager,compile, ~+300 s).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
# torch (the paper code) and JAX share the card in one process: JAX allocates on demand
# instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ! python3 -c "import ml_collections, guided_diffusion" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PAPER="${PAPER:-eager}"
LOOP256="${LOOP256:-25}"
if [ "${1:-}" = "--tiny" ]; then
  M="--repeats=2 --warmup=1"
  C128=(--config=configs/imagenet64.py:tiny --label=tiny_a --batch=8 --sample_batch=8 --loop_steps=10)
  C256=(--config=configs/imagenet256.py:tiny --label=tiny_b --batch=4 --sample_batch=8 --loop_steps=5)
  EVAL=(--num_images=16 --batch_size=8 --pr_num=2000 --pr_block=1000 --fid_dim=256 --repeats=1)
  DATA=(--num_images=64 --repeats=1)
else
  M="--repeats=5 --warmup=2 --dtype=bfloat16"
  C128=(--config=configs/imagenet128.py --label=imagenet128 --batch=64 --sample_batch=64 --loop_steps=250)
  C256=(--config=configs/imagenet256.py --label=imagenet256 --batch=32 --sample_batch=64 --loop_steps="$LOOP256")
  EVAL=(--num_images=4096 --batch_size=512 --pr_num=50000 --pr_block=10000 --fid_dim=2048 --repeats=1)
  DATA=(--num_images=2048 --repeats=2 --threads=1,4,8,16)
fi
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv \
  2>/dev/null | tee "$OUT/card.txt"
VERSIONS="import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())"
python3 -c "$VERSIONS" 2>&1 | tee -a "$OUT/card.txt"
for spec in C128 C256; do
  declare -n args="$spec"
  name="${args[1]#--label=}"
  start=$SECONDS
  # shellcheck disable=SC2086
  python3 bench/bench_model.py "${args[@]}" $M --paper="$PAPER" --json="$OUT/model_$name.json" \
    2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/model_$name.log" || status=1
  echo "== $name: $((SECONDS - start)) s"
done
start=$SECONDS
python3 bench/bench_evaluation.py "${EVAL[@]}" --compare_precision=DEFAULT 2>&1 \
  | grep -v "^[IW][0-9]" | tee "$OUT/evaluation.log" || status=1
echo "== evaluation: $((SECONDS - start)) s"
start=$SECONDS
python3 bench/bench_data.py "${DATA[@]}" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/data.log" \
  || status=1
echo "== data: $((SECONDS - start)) s"
exit $status
