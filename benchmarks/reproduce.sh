#!/usr/bin/env bash
# The commands behind this repository's benchmark tables (benchmarks/README.md), with every
# path explicit: `mmpeft bench` itself has no paths of this repository built in, so it runs
# from an installed package on any recipe, bundle or image folder.
#   bash benchmarks/reproduce.sh NAME [key=value ...]   one table (extra overrides go to its runs)
#   bash benchmarks/reproduce.sh list                   the names
# Run from anywhere; results go to benchmarks/results/ as the README says. VQA-RAD is read
# from $MMPEFT_VQA_RAD_ROOT (default ../shared/vqa_rad beside the checkout), FSDD likewise.
# The GPU run is benchmarks/device_throughput.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-list}
shift || true
R=benchmarks/results
case "$name" in
  quickstart) mmpeft bench quickstart --recipe recipes/quickstart.yaml --out $R "$@" ;;
  methods) mmpeft bench methods --recipe recipes/quickstart.yaml --out $R data.max_train_samples=4000 \
             data.max_test_samples=3000 train.epochs=1 "$@" ;;
  memory) mmpeft bench memory --out $R "$@" ;;  # --cpu: the weight-bytes table only
  vqa-rad) mmpeft bench vqa-rad --recipe recipes/medical_vqa_15ep.yaml --out $R "$@" ;;
  vqa-rad-search) mmpeft bench search benchmarks/vqa_rad_search.yaml --out $R/vqa_rad_search_h100 --jobs 14 --threads 1 \
                    train.mixed_precision=no "$@" ;;
  vqa-rad-multitask) mmpeft bench search benchmarks/vqa_rad_multitask_search.yaml --out $R/vqa_rad_multitask --jobs 2 \
                       --threads 1 "$@" ;;
  audio-visual) mmpeft bench search benchmarks/audio_visual_search.yaml --out $R/audio_visual --jobs 2 --threads 1 "$@" ;;
  task-sampling) mmpeft bench search benchmarks/task_sampling_search.yaml --out $R/task_sampling --jobs 2 --threads 1 "$@" ;;
  serve) mmpeft bench serve --bundles adapters/vqa_rad_bitfit_hadamard_all40,adapters/vqa_rad_bitfit_hadamard,adapters/vqa_rad_bitfit_hadamard_25ep \
           --images "${MMPEFT_VQA_RAD_ROOT:-../shared/vqa_rad}/images" --out $R/serve "$@" ;;
  serve-chat) [ -f adapters/easy_vqa_caption/manifest.json ] || mmpeft finetune recipes/easy_vqa_caption.yaml
              mmpeft bench serve --chat adapters/easy_vqa_caption --out $R/serve_chat \
                --images "$(python -c 'import easy_vqa, os; print(os.path.dirname(easy_vqa.__file__))')/data/test/images" "$@" ;;
  throughput) mmpeft bench throughput --recipe recipes/quickstart.yaml --out $R/throughput "$@" ;;
  contrastive) mmpeft bench contrastive --recipe recipes/easy_vqa_contrastive.yaml --out $R/contrastive "$@" ;;
  contrastive-sigmoid) mmpeft bench contrastive --recipe recipes/easy_vqa_contrastive.yaml --out $R/contrastive_sigmoid \
                         task.loss=sigmoid "$@" ;;
  caption) mmpeft bench generate --recipe recipes/easy_vqa_caption.yaml --out $R/caption "$@" ;;
  video-contrastive) mmpeft bench contrastive --recipe recipes/moving_shapes_contrastive.yaml --out $R/video_contrastive "$@" ;;
  video) mmpeft bench video --recipe recipes/moving_shapes_video.yaml --out $R/video "$@" ;;
  faults) mmpeft bench faults --recipe recipes/quickstart.yaml --out $R/faults "$@" ;;
  list) echo "quickstart methods memory vqa-rad vqa-rad-search vqa-rad-multitask audio-visual task-sampling serve serve-chat throughput"\
             "contrastive contrastive-sigmoid caption video video-contrastive faults" ;;
  *) echo "unknown benchmark '$name'; run: bash benchmarks/reproduce.sh list" >&2; exit 2 ;;
esac
