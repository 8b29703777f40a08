#!/usr/bin/env bash
# The GPU checks of a session that the device tool lends a GPU, as one prepared script: a lease is 15 minutes of
# device time in all, starts included, so nothing is worked out on the machine.
#
#   bash benchmarks/gpu_session.sh fetch   # here, first: the wheels the device image lacks, into .whl/ (ignored)
#   bash benchmarks/gpu_session.sh run     # there, as the device tool's command, carrying .whl; results in $OUT
#
# `run` profiles the real-size layer stack's shape (Llama-3-8B) into profiles/<TYPE>.json, runs the stack fidelity
# benchmark against it, the idle-wait benchmark on that shape and the dequantizing layers' workspace and error check
# on a BLOOM-176B matrix (benchmarks/dequant_workspace.py --device cuda), then profiles the paper's shapes and
# Llama-3-70B while time is left (each shape is written into the file as it finishes, so a cut-off run keeps what it
# measured).
# Copy $OUT's files into the repository.
# Overrides for a smoke test on a CPU: DEVICE=cpu STACK=<checkpoint> MODELS="<checkpoint> ..." OUT=<dir>.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image (python 3.12, torch, transformers, numpy, psutil, tqdm, pyyaml, httpx) does not hold.
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 pulp==3.3.2
        highspy==1.16.0 compressed-tensors==0.20.0 loguru==0.7.3)

fetch() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    du -sh .whl
}

profile() {  # model, device
    # tqdm's bars are one long line of carriage returns: the log keeps the summary only
    python3 -m llmpq_serve.cli profile --model "$1" --device "$2" 2>&1 | { grep -v 'sample/s' || true; } \
        | tee -a "$OUT/profile.txt"
    # the tables written so far, in case the device tool's limit cuts the run (at most 8 files come back)
    find profiles -name '*.json' -newer "$OUT/device.txt" -exec cp {} "$OUT/" \;
}

run() {
    : "${OUT:?run it through the device tool, or set OUT}"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    local device=${DEVICE:-cuda} stack=${STACK:-llama-3-8b}
    local models=${MODELS:-opt-13b opt-30b opt-66b bloom-176b llama-3-70b}
    local deadline=$((SECONDS + ${BUDGET_S:-540}))
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } 2>&1 | tee "$OUT/device.txt"
    profile "$stack" "$device"
    if python3 benchmarks/costmodel_fidelity.py --stack "$stack" --device "$device" --json \
            > "$OUT/costmodel_fidelity_stack.json"; then
        python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))
print("stack fidelity: median", d["median_abs_rel_error"], "max", d["max_abs_rel_error"])' \
            "$OUT/costmodel_fidelity_stack.json"
    else
        echo "stack fidelity failed: see the output above"
    fi
    # does a GPU stage's call after an idle wait take longer than back to back, as a CPU stage's does? (~10 s)
    python3 benchmarks/idle_gap.py --model "$stack" --layers 8 --rows 16 --context 256 --device "$device" --json \
        | tee "$OUT/idle_gap.json" || echo "idle gap failed: see the output above"
    if [[ $device == cuda ]]; then  # ~20 s
        python3 benchmarks/dequant_workspace.py --device cuda --json | tee "$OUT/dequant_workspace_gpu.json" \
            || echo "dequant workspace failed: see the output above"
    fi
    for model in $models; do
        # the large shapes took ~1 min each on an H100; none starts that could not finish in time
        if (( SECONDS + 75 > deadline )); then echo "out of time before $model"; break; fi
        profile "$model" "$device"
    done
    # what the next lent GPU still has to measure again (see llmpq_serve/runtime/kernel_revisions.py)
    python3 -c 'import sys; from llmpq_serve.profile_table import Profile
for path in sys.argv[1:]:
    for t in Profile.load(path).tables:
        old = t.outdated_bits()
        print(path, t.shape.arch, t.shape.hidden, "outdated bits:", old or "none")' profiles/*.json \
        | tee "$OUT/outdated.txt" || true
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
