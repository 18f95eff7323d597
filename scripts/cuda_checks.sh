#!/usr/bin/env bash
# The GPU checks of the CUDA-graph step and of stacked sweeps, in one go, on a machine with a
# CUDA device, sweeplab installed and SWEEPLAB_DATA_DIR pointing at the folder holding MNIST/raw.
#   bash scripts/cuda_checks.sh [work folder, default ./cuda-checks]
# DEVICE=cpu EPOCHS=1 MEMBERS=4 runs the same steps on CPU (a dry run of the script itself).
# Prints, acceptance numbers first: the device; how long MLflow's walk of the installed
# distributions takes there; seed_mlp twice (time/epoch_s, test/acc, wall; the two must be
# identical) and seed_logreg, graphs on; the 64-job stacked sweep; the benchmark's eager-vs-graph
# comparison and seed_mlp's end-to-end breakdown; where a first epoch and a stack's step spend
# their time (scripts/cuda_anatomy.py); the CUDA-only tests (when pytest is installed).
# A step that fails or runs past its time limit prints the end of its log, and the next one runs;
# every step's full log stays in the work folder. Exits non-zero if any step failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-cuda-checks}
mkdir -p "$work" && cd "$work"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db" MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
device=${DEVICE:-cuda}
epochs=${EPOCHS:-3}
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$name.log" 2>&1
  rc=$?
  local wall
  wall=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "$name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over its ${limit} s"), wall $wall s); end of $name.log:"
    tail -25 "$name.log" | sed 's/^/    /'
    return 1
  fi
  echo "$name: wall $wall s"
}

python -c 'import torch; print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch", torch.__version__)'
# A Python that writes no bytecode (PYTHONDONTWRITEBYTECODE, which container images often set, or
# read-only site-packages without it) compiles every module it imports in every process: ~3000
# modules, ~8 s per sweeplab process on an H200 machine. An ordinary install compiles them once;
# here they are cached once in the work folder, so that the timings below are sweeplab's.
echo "bytecode: PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}; cached under $PWD/pycache"
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$PWD/pycache"
s=$(date +%s.%N)
python -c 'import sweeplab.cli.train, sweeplab.run.task, torch._dynamo, matplotlib.pyplot, sklearn.decomposition, mlflow.pytorch'
echo "  compiled in $(python -c "print(f'{$(date +%s.%N) - $s:.1f}')") s"
# what a run's artifacts child spends before it can write a model (MLflow's requirements check)
python -c 'import time, importlib_metadata as m; t = time.perf_counter(); n = len(m.packages_distributions())
print(f"installed distributions walked: {n} modules mapped in {time.perf_counter() - t:.2f} s")'

step seed_mlp 90 sweeplab experiment=seed_mlp device=$device
step seed_mlp_again 90 sweeplab experiment=seed_mlp device=$device
step seed_logreg 90 sweeplab experiment=seed_logreg device=$device
grep -h "cuda_graph" seed_*.log | sort -u | sed 's/^/  /'  # a fallback to eager steps says why
python - <<'EOF' || failed=1
import mlflow

client = mlflow.MlflowClient()
runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id], order_by=["attributes.start_time"])
for run in runs:
    m = run.data.metrics
    epochs = sorted(client.get_metric_history(run.info.run_id, "time/epoch_s"), key=lambda e: e.step)
    print(f"  {run.data.params['model.name']:7} {run.info.status:8} time/epoch_s {m['time/epoch_s']:.3f} "
          f"(first epoch {epochs[0].value:.3f})  "
          f"test/acc {m['test/acc']:.4f}  training {m['time/training_s']:.2f} s  data {m['time/data_s']:.2f} s  "
          f"setup {m['time/setup_s']:.2f} s  model logging {m['time/model_logging_s']:.2f} s")
mlps = [r for r in runs if r.data.params["model.name"] == "mlp"]
if len(mlps) == 2:
    first, second = mlps
    keys = sorted(k for k in first.data.metrics if not k.startswith(("time/", "throughput/")))
    same = all(first.data.metrics[k] == second.data.metrics[k] for k in keys)
    print(f"  seed_mlp twice, same seed: {'identical' if same else 'DIFFERENT'} metrics ({len(keys)} compared)")
EOF

bench=(python "$repo/scripts/benchmark.py" --device "$device" --epochs "$epochs" --parts)
step stacked_wide 180 "${bench[@]}" stacked-wide && cat stacked_wide.log
step graph_e2e 120 "${bench[@]}" graph e2e && cat graph_e2e.log
# where a first epoch and a stack's step spend their time, in a process of its own
step anatomy 120 python "$repo/scripts/cuda_anatomy.py" --device "$device" --members "${MEMBERS:-64}" \
  && grep -v "^\[" anatomy.log
# the same without the rehearsal of first uses: what it takes off a first epoch
step anatomy_unrehearsed 120 python "$repo/scripts/cuda_anatomy.py" --device "$device" \
  --members "${MEMBERS:-64}" --no-rehearsal && grep -v "^\[" anatomy_unrehearsed.log

if python -c 'import pytest' 2> /dev/null; then
  step cuda_tests 180 bash -c "cd '$repo' && python -m pytest -q -p no:cacheprovider -rs \
    tests/test_step.py tests/test_stacked.py tests/test_first_uses.py tests/test_rehearsal.py -k cuda"
  tail -3 cuda_tests.log
else
  echo "pytest not installed: CUDA-only tests not run"
fi
exit $failed
