#!/usr/bin/env bash
# On a GPU machine, from the repository root, each command under 10 minutes:
#   bash benchmarks/gpu.sh check [BACKEND...]   # the conformance suite on CUDA
#   CHECK_PART=1/2 bash benchmarks/gpu.sh check triton   # then 2/2: the suite in two calls
#   bash benchmarks/gpu.sh bench   # the standard grid and the decoding table, compared with
#                                  # the committed results of this GPU
#   bash benchmarks/gpu.sh varlen  # the packed variable-length table (attnkit bench --varlen)
#   bash benchmarks/gpu.sh paged   # paged against contiguous decoding (--decode --paged)
#   bash benchmarks/gpu.sh model-step  # a random Llama's training and decode step with
#                                      # attn_implementation="attnkit" beside "sdpa"
#                                      # (--model-step; needs transformers installed)
#   bash benchmarks/gpu.sh cp-check   # attnkit.distributed over NCCL: world size 1 and, with
#                                     # several GPUs, all of them
#   bash benchmarks/gpu.sh cp-bench   # attnkit bench --context-parallel (torchrun over every
#                                     # GPU; on one GPU, world size 1 and the prediction)
# Logs and results go under $OUT (default /tmp/attnkit-out); bench writes $OUT/<gpu>/ in the
# layout of benchmarks/results/<gpu>/. Where the tree is a copy (without .git, or with an
# older one), set ATTNKIT_BENCH_COMMIT=<commit> so the results name the commit they ran.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnkit-out}
mkdir -p "$OUT"
mode=${1:-}
case "$mode" in
check | bench | varlen | paged | model-step | cp-check | cp-bench) ;;
*) echo "usage: bash benchmarks/gpu.sh check|bench|varlen|paged|model-step|cp-check|cp-bench" >&2
   exit 2 ;;
esac

# Editable, no dependencies (torch, triton and cupy come with the machine; it may have no
# network), no build isolation (setuptools is already there).
python -m pip install -q --no-deps --no-build-isolation -e . -e plugins/torch_blocked \
    -e plugins/triton -e plugins/cupy > "$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv,noheader
python - << 'EOF'
import importlib.metadata as md
import torch
names = ("torch", "triton", "cupy-cuda12x", "cupy-cuda13x", "transformers", "pytest",
         "pytest-xdist")
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(", ".join(found), "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
EOF
python -m attnkit.cli backends 2>&1 | grep -E "^[a-z]|available|FAILED"

if [ "$mode" = check ]; then
    # pytest-xdist is not promised on the machine: without it the suite runs in one process.
    # CHECK_WORKERS sets the xdist workers (default three per four cores: compiling is the
    # cold suite's main cost; 12 on a 16-core H100 host ran each part in under 300 s).
    if python -c "import xdist" 2> /dev/null; then
        workers=(-n "${CHECK_WORKERS:-$(( $(nproc) * 3 / 4 ))}"); else workers=(); fi
    # Backends after the mode (default: all three). The triton suite outlasts one 10-minute
    # call (~500 s cold on an H100 host): run it in parts, CHECK_PART=1/2 then 2/2, one call
    # each; cupy and torch-blocked in calls of their own.
    backends=("${@:2}")
    [ ${#backends[@]} -gt 0 ] || backends=(triton cupy torch-blocked)
    part=()
    [ -n "${CHECK_PART:-}" ] && part=(--part "$CHECK_PART")
    for b in "${backends[@]}"; do
        log="$OUT/check-$b${CHECK_PART:+-part${CHECK_PART%/*}}.log"
        timeout "${CHECK_TIMEOUT:-540}" python -m attnkit.cli check "$b" --device cuda \
            ${part[@]+"${part[@]}"} -- ${workers[@]+"${workers[@]}"} -p no:randomly > "$log" 2>&1
        rc=$?
        counts=$(grep -E "[0-9]+ (passed|failed|error)" "$log" | tail -1)
        echo "== attnkit check $b --device cuda ${CHECK_PART:+--part $CHECK_PART}: rc=$rc" \
            "${counts:-no pytest summary (see $log)}"
    done
    exit 0
fi

# bench: the GPU's short name (NVIDIA H100 80GB HBM3 -> h100) names the results directory.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
    | sed -E 's/^NVIDIA //; s/ .*//' | tr '[:upper:]' '[:lower:]')
dir="$OUT/$gpu"

if [ "$mode" = cp-check ]; then
    timeout 540 python -m pytest tests/test_distributed_nccl.py -q -p no:randomly \
        > "$OUT/cp-check.log" 2>&1
    echo "== tests/test_distributed_nccl.py: rc=$? $(grep -E "[0-9]+ (passed|failed|error)" \
        "$OUT/cp-check.log" | tail -1) ($OUT/cp-check.log)"
    exit 0
fi
if [ "$mode" = cp-bench ]; then
    n=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
    if [ "$n" -gt 1 ]; then launch=(torchrun --standalone --nproc-per-node "$n" -m); else
        launch=(python -m); fi
    timeout 540 "${launch[@]}" attnkit.cli bench --context-parallel --out "$dir" \
        > "$OUT/cp-bench.log" 2>&1
    echo "== attnkit bench --context-parallel on $n GPU(s): rc=$?, $dir/context_parallel.{json,txt}"
    cat "$dir/context_parallel.txt" 2> /dev/null || tail -30 "$OUT/cp-bench.log"
    exit 0
fi
committed="benchmarks/results/$gpu"
if [ "$mode" = varlen ]; then
    python -m attnkit.cli bench --varlen --out "$dir" --quiet --no-plot \
        --backends triton,sdpa-nested,sdpa-flash-padded --time-limit-s 480 \
        > "$OUT/varlen.log" 2>&1
    echo "== attnkit bench --varlen: rc=$?, $dir/varlen.{json,txt}"
    cat "$OUT/varlen.log"
    exit 0
fi
if [ "$mode" = paged ]; then
    python -m attnkit.cli bench --decode --paged --out "$dir" --quiet --no-plot \
        --backends triton,cupy,torch-blocked --time-limit-s 480 > "$OUT/paged.log" 2>&1
    echo "== attnkit bench --decode --paged: rc=$?, $dir/paged.{json,txt}"
    cat "$OUT/paged.log"
    exit 0
fi
if [ "$mode" = model-step ]; then
    timeout 540 python -m attnkit.cli bench --model-step --out "$dir" --quiet \
        > "$OUT/model-step.log" 2>&1
    echo "== attnkit bench --model-step: rc=$?, $dir/model_step.{json,txt}"
    cat "$OUT/model-step.log"
    exit 0
fi
compare=()
[ -d "$committed" ] && compare=(--compare "$committed")
python -m attnkit.cli bench --out "$dir" --quiet --backends triton,cupy,sdpa-flash,sdpa-cudnn \
    --time-limit-s 420 ${compare[@]+"${compare[@]}"} > "$OUT/bench.log" 2>&1
echo "== attnkit bench (grid): rc=$?, $dir/bench.{json,txt,png}"
python -m attnkit.cli bench --decode --out "$dir" --quiet --time-limit-s 60 \
    ${compare[@]+"${compare[@]}"} > "$OUT/decode.log" 2>&1
echo "== attnkit bench --decode: rc=$?, $dir/decode.{json,txt,png}"
for log in bench decode; do
    grep -A 8 "^Summary" "$OUT/$log.log"
done
if [ ${#compare[@]} -eq 0 ]; then
    echo "no committed results for $gpu ($committed): nothing to compare with"
    exit 0
fi
for log in bench decode; do
    echo
    sed -n '/^Against /,$p' "$OUT/$log.log"
done
