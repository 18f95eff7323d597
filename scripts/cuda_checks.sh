#!/usr/bin/env bash
# The GPU checks of the CUDA-graph step and of stacked sweeps, in one go, on a machine with a
# CUDA device, sweeplab installed and SWEEPLAB_DATA_DIR pointing at the folder holding MNIST/raw.
#   bash scripts/cuda_checks.sh [work folder, default ./cuda-checks]
# DEVICE=cpu EPOCHS=1 runs the same steps on CPU (a dry run of the script itself).
# Prints: the device; how long MLflow's walk of the installed distributions takes there; seed_mlp
# twice (time/epoch_s, test/acc, wall; the two must be identical) and seed_logreg, graphs on;
# the CUDA-only tests (when pytest is installed); the benchmark's eager-vs-graph comparison,
# seed_mlp's end-to-end breakdown and the 64-job stacked sweep.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-cuda-checks}
mkdir -p "$work" && cd "$work"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"
device=${DEVICE:-cuda}
python -c 'import torch; print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
# what a run's artifacts child spends before it can write a model (MLflow's requirements check)
python -c 'import time, importlib_metadata as m; t = time.perf_counter(); n = len(m.packages_distributions())
print(f"installed distributions walked: {n} modules mapped in {time.perf_counter() - t:.2f} s")'

for preset in seed_mlp seed_mlp seed_logreg; do
  start=$(date +%s.%N)
  sweeplab experiment=$preset device=$device > "$preset.log" 2>&1 || { tail -20 "$preset.log"; exit 1; }
  echo "$preset: wall $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
done
python - <<'EOF'
import mlflow

client = mlflow.MlflowClient()
runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id], order_by=["attributes.start_time"])
for run in runs:
    m = run.data.metrics
    print(f"  {run.data.params['model.name']:7} time/epoch_s {m['time/epoch_s']:.3f}  test/acc {m['test/acc']:.4f}  "
          f"training {m['time/training_s']:.2f} s  data {m['time/data_s']:.2f} s  model logging {m['time/model_logging_s']:.2f} s")
first, second = runs[0], runs[1]
keys = sorted(k for k in first.data.metrics if not k.startswith(("time/", "throughput/")))
same = all(first.data.metrics[k] == second.data.metrics[k] for k in keys)
print(f"  seed_mlp twice, same seed: {'identical' if same else 'DIFFERENT'} metrics ({len(keys)} compared)")
EOF

if python -c 'import pytest' 2> /dev/null; then
  (cd "$repo" && python -m pytest -q -p no:cacheprovider tests/test_step.py tests/test_stacked.py -k cuda) || true
else
  echo "pytest not installed: CUDA-only tests not run"
fi
python "$repo/scripts/benchmark.py" --device "$device" --epochs "${EPOCHS:-3}" --parts compare e2e stacked-wide 2>&1 | grep -v "Downloading artifacts"
