#!/bin/bash
# One GPU call (2026-12-07): the train stage's default after the train/ package split (#33: same figures as
# before?) and the vision-language LoRA benchmark (#34). Wheels in .whl as for issue36_call.sh.
#   OUT=<results folder> bash benchmarks/after_refactor_call.sh
set -u
OUT=${OUT:-/tmp/after-refactor}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__); \
import importlib.util as u; print('torchvision', bool(u.find_spec('torchvision')))" | tee -a "$OUT/env.txt"
timeout -k 10 "${PART_A:-240}" python3 benchmarks/train_stacks.py --steps 10 --stacks stage-default-nockpt \
    stage-default-ckpt --out "$OUT/train_stacks_after_refactor.json" 2>&1 | tee "$OUT/train.log" | \
    grep -vE "it/s\]|s/it\]|row/s\]" | tail -20
rm -rf /tmp/snaketune-stacks
timeout -k 10 "${PART_B:-300}" python3 benchmarks/vision_train.py --out "$OUT/vision_train.json" 2>&1 | \
    tee "$OUT/vision.log" | grep -vE "it/s\]|s/it\]|row/s\]" | tail -20
