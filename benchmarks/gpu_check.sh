#!/usr/bin/env bash
# One GPU check, about 4-6 minutes on an H200 without network:
#   decode the JPEG bundle -> benchmarks/speed.py (cuda) -> ex1_convnet.py (default recipe)
#   -> ex2_transfer.py --scratch -> one table: seconds per epoch, end-to-end seconds, test accuracy,
#   ratio to the original pipeline (whose epoch time comes from speed.py's figure 3).
#
#   bash benchmarks/gpu_check.sh BUNDLE OUT_DIR [--smoke]
#
# BUNDLE is cifar10-jpeg.npz. Its decoder is $CIFAR_TOOL, else cifar10_from_jpeg.py beside the bundle
# (e.g. .gpu/cifar10-jpeg.npz + .gpu/cifar10_from_jpeg.py), else ../tools/ beside it (the shared layout),
# else a small inline numpy+PIL decoder. OUT_DIR gets the logs, speed.json, each run's metrics and history,
# gpu_check.json and gpu_check.md; data and checkpoints stay in a scratch folder ($GPU_CHECK_WORK or a new
# temporary one). --smoke runs the same steps on the CPU with tiny settings and only the first 1,000 test images.
# Environment: PYTHON (default .venv/bin/python if present, else python3); SPEED_ARGS, EX1_ARGS, EX2_ARGS
# are appended to the steps' command lines (e.g. EX1_ARGS="--epochs 10" when time is short).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh BUNDLE OUT_DIR [--smoke]" >&2; exit 2; }
[[ $# -eq 2 || ( $# -eq 3 && $3 == --smoke ) ]] || usage
[[ -f $1 ]] || { echo "error: bundle $1 not found" >&2; exit 2; }
BUNDLE=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
mkdir -p "$2" || exit 2
OUT=$(cd "$2" && pwd)
SMOKE=${3:-}
cd "$(dirname "$0")/.." || exit 2
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
DATA=$WORK/data
export PYTHONUNBUFFERED=1

if [[ -n $SMOKE ]]; then
  SPEED=(--device cpu --images 256 --batch-size 128 --aug-images 256 --warmup 1)
  TRAIN=(--device cpu --limit-train 512 --epochs 1 --val-size 256)
else
  SPEED=(--device cuda)
  TRAIN=(--device cuda)
fi

: > "$OUT/steps.tsv"
# step NAME CMD...: run CMD with its output in OUT/NAME.log; record exit code and seconds in OUT/steps.tsv.
step() {
  local name=$1; shift
  echo "== $name: $*"
  local start end rc
  start=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >> "$OUT/steps.tsv"
  if [[ $rc -ne 0 ]]; then
    echo "   FAILED (exit $rc) after ${seconds}s; last lines of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | tr '\r' '\n' | tail -n 20 | sed 's/^/   | /'
  else
    echo "   done in ${seconds}s"
  fi
  return $rc
}

decode() {  # decode DEST BUNDLE
  local tool
  for tool in "${CIFAR_TOOL:-}" "$(dirname "$BUNDLE")/cifar10_from_jpeg.py" "$(dirname "$BUNDLE")/../tools/cifar10_from_jpeg.py"; do
    if [[ -n $tool && -f $tool ]]; then
      echo "decoder: $tool"
      "$PYTHON" "$tool" "$@"
      return
    fi
  done
  echo "decoder: inline (no cifar10_from_jpeg.py found)"
  "$PYTHON" - "$@" <<'EOF'
import io, os, pickle, sys
import numpy as np
from PIL import Image

dest, bundle = sys.argv[1:3]
out = os.path.join(dest, "cifar-10-batches-py")
os.makedirs(out, exist_ok=True)
b = np.load(bundle)

def decode(jpeg, offsets):
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     .transpose(2, 0, 1) for i in range(len(offsets) - 1)]).reshape(-1, 3072)

def dump(name, record):
    with open(os.path.join(out, name), "wb") as f:
        pickle.dump(record, f, protocol=4)

train = decode(b["train_jpeg"], b["train_offsets"])
for k in range(5):
    s = slice(10000 * k, 10000 * (k + 1))
    dump(f"data_batch_{k + 1}", {"labels": [int(v) for v in b["train_labels"][s]], "data": train[s]})
dump("test_batch", {"labels": [int(v) for v in b["test_labels"]], "data": decode(b["test_jpeg"], b["test_offsets"])})
dump("batches.meta", {"label_names": [str(n) for n in b["label_names"]]})
print(out)
EOF
}

trim_test() {  # trim_test DEST: keep the first 1,000 test images (the official first 1,000), for short CPU test reports
  "$PYTHON" - "$1/cifar-10-batches-py/test_batch" <<'EOF'
import os, pickle, sys
path = sys.argv[1]
with open(path, "rb") as f:
    record = pickle.load(f)
record = {k: v[:1000] if k in ("data", "labels", "filenames") else v for k, v in record.items()}
with open(path + ".tmp", "wb") as f:
    pickle.dump(record, f, protocol=4)
os.replace(path + ".tmp", path)
print(f"{path}: kept the first {len(record['labels'])} test images")
EOF
}

environment() {
  "$PYTHON" -c 'import os, sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, "cpus", os.cpu_count(), "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  if command -v nvidia-smi > /dev/null; then nvidia-smi; fi
  return 0
}

echo "gpu_check${SMOKE:+ (smoke)}: python $PYTHON, scratch $WORK, results $OUT"
step environment environment
step decode decode "$DATA" "$BUNDLE" || exit 1
if [[ -n $SMOKE ]]; then step smoke-test-set trim_test "$DATA" || exit 1; fi
# shellcheck disable=SC2086  # *_ARGS are word-split on purpose
step speed "$PYTHON" benchmarks/speed.py --data-dir "$DATA" --json "$OUT/speed.json" "${SPEED[@]}" ${SPEED_ARGS:-}
# shellcheck disable=SC2086
step ex1 "$PYTHON" ex1_convnet.py --no-download --data-dir "$DATA" --out-dir "$WORK/ex1" --overwrite "${TRAIN[@]}" ${EX1_ARGS:-}
# shellcheck disable=SC2086
step ex2-scratch "$PYTHON" ex2_transfer.py --scratch --no-download --data-dir "$DATA" --out-dir "$WORK/ex2-scratch" \
  --overwrite "${TRAIN[@]}" ${EX2_ARGS:-}
for run in ex1 ex2-scratch; do  # the small results only: no checkpoints
  mkdir -p "$OUT/$run"
  cp "$WORK/$run"/*.json "$WORK/$run"/*.png "$OUT/$run/" 2>/dev/null
done

"$PYTHON" - "$OUT" "${SMOKE:-full}" <<'EOF'
"""gpu_check.json and gpu_check.md from steps.tsv, speed.json and the runs' metrics and history."""
import json, statistics, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2].lstrip("-")
steps = {name: {"exit_code": int(rc), "seconds": float(s)}
         for name, rc, s in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}
load = lambda p: json.loads(p.read_text()) if p.exists() else None  # noqa: E731
speed = load(out / "speed.json")
runs = {name: (load(out / name / "metrics.json"), load(out / name / "history.json")) for name in ("ex1", "ex2-scratch")}

# The epoch the runs train on: 49,000 images unless --limit-train/--val-size say otherwise.
ex1_settings = (runs["ex1"][0] or {}).get("settings", {})
epoch_images = min(ex1_settings.get("limit_train") or 10**9, 50_000 - ex1_settings.get("val_size", 1000))
original_epoch_s = epoch_images / speed["original_img_s"] if speed else None
epochs = ex1_settings.get("epochs", 30)

fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
rows = []
if speed:
    rows.append({"run": "original pipeline (speed.py 3, ex1 ConvNet)", "seconds_per_epoch": original_epoch_s,
                 "images_per_s": speed["original_img_s"], "end_to_end_s": None,
                 "end_to_end_note": f"≈{epochs * original_epoch_s:.0f} ({epochs} epoch{'s' * (epochs != 1)} of training, estimated)",
                 "test_accuracy": None, "test_accuracy_first1000": None, "speedup_vs_original": 1.0})
for name, (metrics, history) in runs.items():
    if not metrics or not history:
        rows.append({"run": f"{name} (failed: see {name}.log)"})
        continue
    per_epoch = statistics.median(r["seconds"] for r in history)
    n = metrics["epochs_run"]
    rows.append({"run": f"{name} ({n} epoch{'s' * (n != 1)}, {metrics['precision']}, {metrics['device']})",
                 "seconds_per_epoch": per_epoch, "images_per_s": statistics.median(r["images_per_s"] for r in history),
                 "end_to_end_s": steps.get(name, {}).get("seconds"), "test_accuracy": metrics["test_accuracy"],
                 "test_accuracy_first1000": metrics["test_accuracy_first1000"],
                 "speedup_vs_original": original_epoch_s / per_epoch if original_epoch_s else None})

lines = [f"# GPU check ({mode})", "",
         f"Epoch: {epoch_images:,} training images. Seconds per epoch: median training time of one epoch "
         f"(the original pipeline's: {epoch_images:,} / speed.py's images/s). End-to-end: the whole command "
         f"(start-up, data, training, validation, checkpoints, test report). Speed-up: original pipeline's "
         f"seconds per epoch / the run's (for ex2, whose network differs, only a rough yardstick).", "",
         "| run | s/epoch | images/s | end-to-end s | test acc | first 1000 | speed-up vs original |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    lines.append(f"| {r['run']} | {fmt(r.get('seconds_per_epoch'), '.2f')} | {fmt(r.get('images_per_s'), ',.0f')} | "
                 f"{r.get('end_to_end_note') or fmt(r.get('end_to_end_s'), '.0f')} | "
                 f"{fmt(r.get('test_accuracy'), '.2%')} | {fmt(r.get('test_accuracy_first1000'), '.2%')} | "
                 f"{fmt(r.get('speedup_vs_original'), '.1f')}{'' if r.get('speedup_vs_original') is None else 'x'} |")
if speed:
    lines += ["", f"speed.py on {speed['device']} ({speed['precision']}, batch {speed['batch_size']}, "
                  f"{speed['images']:,} images): bare model {speed['model_img_s']:,.0f} images/s, training loop "
                  f"{speed['loop_img_s']:,.0f}, original pipeline {speed['original_img_s']:,.0f} "
                  f"({speed['workers']} workers); loop/model {speed['loop_vs_model']:.2f}, loop/original "
                  f"{speed['loop_vs_original']:.2f}; augmentation batched {speed['aug_batched_img_s']:,.0f} vs PIL "
                  f"{speed['aug_pil_img_s']:,.0f} images/s ({speed['aug_batched_vs_pil']:.1f}x)."]
lines += ["", "Steps: " + ", ".join(f"{k} {v['seconds']:.0f}s" + ("" if v["exit_code"] == 0 else f" (exit {v['exit_code']})")
                                    for k, v in steps.items())]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
(out / "gpu_check.json").write_text(json.dumps({"mode": mode, "epoch_images": epoch_images, "rows": rows,
                                                "steps": steps, "speed": speed}, indent=2) + "\n")
print("\n".join(lines))
sys.exit(1 if any(v["exit_code"] for v in steps.values()) else 0)
EOF
status=$?
echo "wrote $OUT/gpu_check.md and $OUT/gpu_check.json (logs: $OUT/*.log; scratch: $WORK)"
exit $status
