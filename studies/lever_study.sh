#!/usr/bin/env bash
# The cheap-lever study of issue #8 on the custom CNN (120 px): one training run per lever, then
# the distribution-shift proxies for all of them. Results: runs/levers/*/ and runs/levers/robustness/.
#   bash studies/lever_study.sh DATA_DIR ORIGINALS_DIR [LEVER...]
# Runs already finished (model.json present) are skipped, so the study can be restarted.
set -euo pipefail
data=${1:?data dir}; originals=${2:?originals dir}; shift 2
common=(--arch custom --image-size 120 --epochs 6 --seed 42)
# The levers still in the product. The retired ones (CLAHE, label smoothing, weight averaging,
# sharpness matching, framing augmentation, mixup) run from commit 9f89205 (model/report/levers.md).
declare -A levers=(
  [base]=""
  [equalize]="--contrast equalize"
  [equalize-holdout]="--contrast equalize --hold-out-series NORMAL2-IM"
  [equalize-seed-43]="--contrast equalize --seed 43"
  [acquisition]="--augment acquisition"
  [base-seed-43]="--seed 43"
  # The NORMAL2-IM series held out of training and validation: the card's held_out_series is the
  # specificity on a NORMAL series the model never saw.
  [base-holdout]="--hold-out-series NORMAL2-IM"
  [acquisition-holdout]="--augment acquisition --hold-out-series NORMAL2-IM"
  # Input size: at 120 px the global shape of the image may dominate finer lung texture.
  [size-160]="--image-size 160"
  [size-224]="--image-size 224"
)
order=(${@:-base acquisition base-holdout acquisition-holdout base-seed-43 size-160 size-224
            equalize equalize-holdout equalize-seed-43})
models=()
for name in "${order[@]}"; do
  out=runs/levers/$name
  models+=(--model "$out")
  [[ -f $out/model.json ]] && continue
  # shellcheck disable=SC2086
  python -m pneumonia train "$data" "${common[@]}" ${levers[$name]} --out "$out" --resume
done
python -m studies.robustness "$data" "${models[@]}" --originals "$originals" --out runs/levers/robustness
