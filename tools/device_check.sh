#!/usr/bin/env bash
# One check of the engine on the devices present: the device-capable tests, the accelerator benchmark,
# the compile benchmark, a plan, and the whole pipeline on a tiny random model. RESULT lines at the end.
#
#   tools/device_check.sh            # the first accelerator (GPU or TPU); under 8 minutes on one H100
#   tools/device_check.sh --cpu      # the same on the CPU (the 1B layout cut to 2 layers)
#   tools/device_check.sh --cpu --short   # what CI runs: a few tests of each kind, small benchmarks
#
# Run it in an environment with the package and its test extras installed (and jax[cuda12] or
# jax[tpu] on an accelerator); nothing is installed or fetched here.
set -uo pipefail
cd "$(dirname "$0")/.."

platform="" short=0
for arg in "$@"; do
  case "$arg" in
    --cpu) platform=cpu ;;
    --short) short=1 ;;
    *) echo "device_check.sh: unknown argument $arg (expected --cpu, --short)" >&2; exit 2 ;;
  esac
done
if [[ -n "$platform" ]]; then export JAX_PLATFORMS=cpu; fi
export XLA_FLAGS="${XLA_FLAGS:-}"
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
results=()
failed=0

step() {  # step NAME COMMAND...: run, keep its RESULT lines, record pass or fail
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" >"$log/$name.txt" 2>&1; then status=ok; else status=failed; failed=$((failed + 1)); tail -20 "$log/$name.txt"; fi
  grep '^RESULT ' "$log/$name.txt" | while read -r line; do echo "$line"; done >>"$log/results.txt"
  echo "   $status in $((SECONDS - start)) s"
  results+=("RESULT device_check_$name status=$status seconds=$((SECONDS - start))")
}

python -c "import jax; d = jax.devices(); print(f'devices: {len(d)} x {d[0].device_kind} ({d[0].platform}); jax {jax.__version__}')"

if ((short)); then
  tests=(tests/test_model_parity.py::test_logits_match_transformers_on_padded_batch
         tests/test_sampler.py::test_greedy_matches_uncached_reference_for_prompts_of_different_lengths
         tests/test_scan_layers.py::test_scanned_sampling_equals_unrolled)
  step tests python -m pytest -q -x -p no:cacheprovider "${tests[@]}" -k "llama2 or smollm2 or prompts_of"
  step bench_compile python tools/bench_compile.py --layers 2 4
else
  # Mesh tests need 8 devices; on an accelerator only those that fit the devices present run.
  select=()
  if [[ "$platform" != cpu ]]; then select=(-k "not shard and not mesh"); fi
  step tests python -m pytest -q -p no:cacheprovider tests/test_model_parity.py tests/test_sampler.py \
    tests/test_scan_layers.py tests/test_sharding.py "${select[@]}"
  step bench_accel python tools/bench_accel.py ${platform:+--size ci}
  step bench_compile python tools/bench_compile.py --layers 8 16 32 64
  step pipeline python -m pytest -q -p no:cacheprovider tests/test_pipeline.py::test_run_every_stage_then_report
fi
step plan python -m dalign_jax.cli plan configs/quickstart.yaml --stage sft --peak-tflops 1

echo
cat "$log/results.txt"
printf '%s\n' "${results[@]}"
echo "RESULT device_check failed_steps=$failed"
exit $((failed > 0))
