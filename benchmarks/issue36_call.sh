#!/bin/bash
# Issue 36 in one GPU call: every stack, each part under its own timeout, so a hang in one still leaves the
# others' JSON in $OUT. Wheels in .whl (slimmed by benchmarks/slim_wheels.py): unsloth, unsloth_zoo, trl,
# datasets, dill, multiprocess, liger-kernel, bitsandbytes.
#
#   bash benchmarks/issue36_call.sh        # $OUT: where results and logs go; LIMIT: seconds for the whole call
#   PARTS=c bash benchmarks/issue36_call.sh   # only the QLoRA 14B part (PARTS: any of a b c d; default a b c)
#   PARTS="d a" PHASES=1 STACKS="stage-default-nockpt unsloth-ckpt" bash benchmarks/issue36_call.sh
#       # d: where the stage's time goes (profile_train.py --kernels); STACKS: part a's stacks; PHASES=1: part a
#       # records each step's memory by phase; STEPS: part a's optimizer steps (10)
#   BEFORE=.before STACKS_BEFORE="stage-default-nockpt" bash benchmarks/issue36_call.sh
#       # also the stage's code of an earlier commit (.before/scripts), in its own process after part a
set -u
PARTS=" ${PARTS:-a b c} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
OUT=${OUT:-/tmp/issue36}
LIMIT=${LIMIT:-580}
mkdir -p "$OUT"
began=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - began))); }
export PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft, trl, datasets, bitsandbytes, liger_kernel; \
print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, trl.__version__, \
datasets.__version__, bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
echo "setup: $(( $(date +%s) - began )) s" | tee -a "$OUT/env.txt"

# (a) LoRA, Qwen2.5-1.5B shape: the stage's default with and without checkpointing, Unsloth with and without its
# checkpointing (child process), the library stack with packs of 8k and 16k tokens
STACKS=${STACKS:-stage-default-nockpt stage-default-ckpt unsloth-nockpt unsloth-ckpt unsloth-nockpt-16k \
    library-flex_attention-nockpt-8k library-flex_attention-nockpt-16k}
if want a; then
    # the GPU's clocks, power and temperature each second: speeds that move between calls
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv -l 1 > "$OUT/gpu_trace_a.csv" 2>/dev/null &
    trace=$!
    # shellcheck disable=SC2086
    timeout -k 10 "${PART_A:-360}" python3 benchmarks/train_stacks.py --steps "${STEPS:-10}" --stacks $STACKS \
        ${PHASES:+--phases} --out "$OUT/train_stacks_unsloth.json" 2>&1 | tee "$OUT/train.log" | \
        grep -vE "it/s\]|s/it\]|row/s\]"
    kill "$trace" 2>/dev/null
    echo "after (a): $(( $(date +%s) - began )) s"
    cp /tmp/snaketune-stacks/unsloth-stacks.json "$OUT/train_stacks_unsloth_child.json" 2>/dev/null
    # BEFORE: a folder holding an earlier commit's scripts/ (git archive <commit> scripts | tar -x -C .before):
    # STACKS_BEFORE run with that code in their own process, after part a, on the same GPU
    if [ -n "${BEFORE:-}" ]; then
        # shellcheck disable=SC2086
        SNAKETUNE_SCRIPTS="$BEFORE/scripts" timeout -k 10 "${PART_BEFORE:-150}" python3 benchmarks/train_stacks.py \
            --steps "${STEPS:-10}" --stacks ${STACKS_BEFORE:-stage-default-nockpt} \
            --out "$OUT/train_stacks_before.json" 2>&1 | tee "$OUT/train_before.log" | grep -vE "it/s\]|s/it\]|row/s\]"
        echo "after (a, before): $(( $(date +%s) - began )) s"
    fi
fi

# (d) where the stage's time goes (kernels, checkpointing off). Its memory: PHASES=1 in part a (the allocator's
# history, profile_train.py --memory, made the recompute of a compiled layer fail on an H100)
t=$(( $(left) - 10 )); [ "$t" -gt "${PART_D:-150}" ] && t=${PART_D:-150}
if want d && [ "$t" -gt 60 ]; then
    timeout -k 10 "$t" python3 benchmarks/profile_train.py --variant default-nockpt --kernels \
        --out "$OUT/profile_kernels_nockpt.json" > "$OUT/profile_kernels.log" 2>&1
    echo "after (d): $(( $(date +%s) - began )) s"
fi
# (b) predict, Qwen2.5-0.5B shape, bf16: the stage's default, generate with the dynamic cache, generate with the
# static cache and its compiled decoding step
t=$(( $(left) - 10 )); [ "$t" -gt "${PART_B:-150}" ] && t=${PART_B:-150}
if want b && [ "$t" -gt 60 ]; then
    timeout -k 10 "$t" python3 benchmarks/predict_speed.py --shape qwen2.5-0.5b --rows 512 --max-new-tokens 64 \
        --baseline-batch 128 --reference-rows 16 --repeats 2 --static --fp32-check \
        --out "$OUT/predict_static.json" 2>&1 | \
        tee "$OUT/predict.log" | grep -vE "it/s\]|s/it\]|row/s\]"
fi
echo "after (b): $(( $(date +%s) - began )) s"

# (c) QLoRA, Qwen-14B-Chat shape: the stage's default (compiled layers, checkpointing off as auto picks on 80 GB)
# against Unsloth's QLoRA, only if enough time is left
t=$(( $(left) - 5 ))
if want c && [ "$t" -gt 150 ]; then
    rm -rf /tmp/snaketune-stacks/model-qwen2.5-1.5b
    timeout -k 10 "$t" python3 benchmarks/train_stacks.py --shape qwen-14b-chat --steps 6 --tokens-per-step 8192 \
        --stacks stage-qlora-nockpt unsloth-qlora-nockpt --out "$OUT/train_stacks_qlora14b_unsloth.json" 2>&1 | \
        tee "$OUT/qlora14b.log" | grep -vE "it/s\]|s/it\]|row/s\]"
else
    echo "(c) skipped: $t s left"
fi
echo "done: $(( $(date +%s) - began )) s"
