#!/usr/bin/env bash
# Issue 18's / 39's GPU checks as one prepared run, for a session lent a GPU through the device
# tool (15 minutes of device time all told; the tree that travels is capped at 64 MiB).
#   here, once:  bash benchmarks/device_throughput.sh prepare
#                (the wheels the device's image lacks, and a copy of VQA-RAD, into ignored folders)
#   then:        run(command="bash benchmarks/device_throughput.sh", carry=[".whl", ".devdata"], timeout_s=590)
#                (`... device_throughput.sh base` or `... vqa_rad`: that part alone, with the whole call's time)
# (a part that runs out of time leaves throughput.partial.json: every figure measured until then)
# The recipe's own VQA-RAD encoders cannot travel (MiniLM alone is 88 MiB), so the VQA-RAD
# run uses the BERT-base / ViT-B/16-sized random encoders: the recipe's data, batch and
# schedule, and a larger model than its own.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 easy-vqa==1.0 typer==0.29.2
  mkdir -p .devdata && cp -r ../shared/vqa_rad .devdata/
  du -sh .whl .devdata
  exit
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# 1. BERT-base + ViT-B/16 LoRA bf16 on easy-VQA at 224 px, at the largest batch that fits in 16 GiB:
#    the reference loop, finetune (and 5 of its steps under torch.profiler) and each feature toggled, GPU busy, MFU
part=${1:-all}
if [ "$part" = all ] || [ "$part" = base ]; then
timeout "$([ "$part" = base ] && echo 530 || echo 400)" python3 -m mmpeft.cli bench throughput --encoders base --memory-budget-gb 16 --steps 8 --profile-steps 5 --scaling none \
  --manifest-rows none --out "$OUT/base" 2>&1 | tee "$OUT/base.log"
fi
[ "$part" = all ] || [ "$part" = vqa_rad ] || exit 0
# 2. one VQA-RAD run at its recipe's settings: how busy the GPU is, and where a step's time goes
timeout 150 python3 -m mmpeft.cli bench throughput --recipe recipes/medical_vqa.yaml --encoders base --no-features --profile-steps 5 \
  --scaling none --manifest-rows none --out "$OUT/vqa_rad" "data.root=$PWD/.devdata/vqa_rad" 2>&1 | tee "$OUT/vqa_rad.log"
