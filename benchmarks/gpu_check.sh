#!/usr/bin/env bash
# Measure a GPU in minutes: the numbers a first GPU run of bertray needs, in one table and one JSON.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine (after the README's install and a CUDA torch)
#   bash benchmarks/gpu_check.sh --dry-run    # the same code path on CPU: tiny model, 20 steps (CI runs it)
#   bash benchmarks/gpu_check.sh --out DIR --peak-tflops 989
#
# Steps (each writes JSON under --out, default benchmarks/results/gpu_check/):
#   1. step_check: bertray's shared training step (bertray.train.step) on BERT-base pretraining batches
#      at 128 and 512, bf16: sequences/s and MFU, with CUDA's sync debug mode set to "error" (any host
#      sync inside a step fails the check), plus fp16 with loss scaling.
#   2. model_step: the same model step against transformers' BertForPreTraining, at 128 and 512.
#   3. finetune step: SST-2 batches through the trial loop's step, bertray vs transformers.
#   4. optimizer step: LAMB and bert_adam multi-tensor vs the previous per-tensor loop, and AdamW.
#   5. a 300-step Ray Train pretraining of the base preset on the shipped sample corpus through the real
#      pipeline (flows/configs/gpu-check.yaml): sequences/s, MFU and data-wait from its history.
#   6. gpu_summary.py: the table and gpu_check.json, with the targets (MFU >= 45% standalone and >= 40%
#      through Ray at 128, data-wait < 2%).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=benchmarks/results/gpu_check
PEAK=989      # dense bf16 TFLOP/s of an H100/H200 SXM; A100: 312
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --peak-tflops) PEAK="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
RUN_NAME="gpu-check-$(date +%Y%m%d-%H%M%S)-$$"

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu
  STEP_ARGS=(--preset tiny --steps 3 --warmup 1)
  MODEL_ARGS=(--device cpu --preset tiny --rounds 1 --steps 2 --warmup 1)
  MODEL_512_ARGS=(--device cpu --preset tiny --batch-size 4 --seq-len 512 --masked 80 --rounds 1 --steps 1 --warmup 1)
  FINETUNE_ARGS=(--device cpu --rounds 1 --steps 2)
  OPTIMIZER_ARGS=(--device cpu --presets tiny --steps 2 --warmup 1)
  PRETRAIN_ARGS=(--model.preset tiny --train.max_steps 20 --train.log_every 5 --train.warmup_steps 2
                 --scaling.use_gpu false --scaling.cpus_per_worker 1 --data.tokenizer_actors 1
                 --data.tokenizer_cpus 0.5 --data.read_cpus 0.25 --train.corpus_passes 2
                 --train.phases '[{"fraction": 1.0, "max_seq_len": 128, "max_predictions_per_seq": 20, "batch_size": 16}]')
else
  DEVICE=cuda
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device is visible to torch (use --dry-run on CPU)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
  STEP_ARGS=(--preset base)
  MODEL_ARGS=(--device cuda --peak-tflops "$PEAK")
  MODEL_512_ARGS=(--device cuda --peak-tflops "$PEAK" --seq-len 512 --masked 80 --batch-size 8 --cuda-batch-size 32)
  FINETUNE_ARGS=(--device cuda --rounds 5 --steps 20)
  OPTIMIZER_ARGS=(--device cuda --presets base,large --steps 50)
  PRETRAIN_ARGS=()
fi

echo "== 1/5 the shared training step ($DEVICE)"
python benchmarks/step_check.py --device "$DEVICE" --peak-tflops "$PEAK" "${STEP_ARGS[@]}" --json "$OUT/step_check.json"
echo "== 2/5 model step against transformers, sequence 128 and 512"
python benchmarks/model_step.py "${MODEL_ARGS[@]}" --json "$OUT/model_step_128.json"
python benchmarks/model_step.py "${MODEL_512_ARGS[@]}" --json "$OUT/model_step_512.json"
echo "== 3/5 fine-tuning step on SST-2 against transformers"
python benchmarks/finetune.py --parts speed "${FINETUNE_ARGS[@]}" --json "$OUT/finetune_step.json"
echo "== 4/5 optimizer step: multi-tensor against the per-tensor loop"
python benchmarks/optimizer.py "${OPTIMIZER_ARGS[@]}" --json "$OUT/optimizer.json"
echo "== 5/5 Ray Train pretraining through the real pipeline"
python flows/pretrain.py --config flows/configs/gpu-check.yaml --output "$OUT/runs" --name "$RUN_NAME" \
  "${PRETRAIN_ARGS[@]}" --json "$OUT/pretrain.json"
python benchmarks/gpu_summary.py --out "$OUT" --run "$OUT/runs/$RUN_NAME" --peak-tflops "$PEAK" \
  $([[ $DRY_RUN == 1 ]] && echo --dry-run)
