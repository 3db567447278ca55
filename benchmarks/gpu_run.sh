#!/usr/bin/env bash
# One call on a GPU machine: the CUDA-marked tests, then the GPU table of docs/benchmarks.md.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh        # from the repository root
#
# Uses the machine's python3 and its torch (CUDA build). Packages missing there can be given as
# wheels in .whl/ (installed with --target, no network); the H200 image lacks pyro-ppl 1.9.2,
# pyro-api 0.1.2, arviz-base 0.8.2, arviz-stats 0.8.0 and xarray-einstats 0.9.1 (pure-Python
# wheels: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl NAME==VER). Writes under $OUT: gpu.txt (machine),
# tests.log, junit.xml, bench.log and compiled_cuda.json. TEST_S / BENCH_S bound each part.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
root=$PWD
export PYTHONPATH=$root
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$root
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc
  python3 -c "import sys, torch, pyro; print(sys.version.split()[0], torch.__version__, torch.version.cuda, pyro.__version__, torch.cuda.get_device_name())"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# the CUDA tests, strictly (warnings are errors, as in CI); then the failures once more with
# warnings shown, to tell a warning from a wrong result
timeout "${TEST_S:-240}" python3 -m pytest -m cuda -q -rA -p no:randomly -o cache_dir=/tmp/pc \
  --junitxml="$OUT/junit.xml" tests/test_devices.py tests/test_compiled.py 2>&1 | tee "$OUT/tests.log"
if grep -q "failed" "$OUT/tests.log"; then
  timeout 120 python3 -m pytest -m cuda -q -rA -o cache_dir=/tmp/pc --lf -W default \
    tests/test_devices.py tests/test_compiled.py 2>&1 | tail -40 | tee -a "$OUT/tests.log"
fi

# the GPU table: a subset of the contenders (each compiled one costs an inductor compilation,
# tens of seconds for ResNet-20); CONTENDERS=all runs every one
cd "$root/benchmarks" || exit 1
default="identity eager,identity compiled,bnp eager,bnp compiled,identity compiled unroll10"
default="$default,identity compiled cudagraphs"
contenders=${CONTENDERS:-$default}
[ "$contenders" = all ] && contenders=""
timeout "${BENCH_S:-330}" python3 bench_compiled.py --device cuda --threads 0 \
  --cases "${CASES:-mlp-784-400-400-10,resnet20-3x32x32}" --budget "${BUDGET:-8}" \
  ${contenders:+--contenders "$contenders"} --out "$OUT/compiled_cuda.json" 2>&1 | tee "$OUT/bench.log"
