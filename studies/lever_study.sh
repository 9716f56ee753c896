#!/usr/bin/env bash
# The cheap-lever study of issue #8 on the custom CNN (120 px): one training run per lever, then
# the distribution-shift proxies for all of them. Results: runs/levers/*/ and runs/levers/robustness/.
#   bash studies/lever_study.sh DATA_DIR ORIGINALS_DIR [LEVER...]
# Runs already finished (model.json present) are skipped, so the study can be restarted.
set -euo pipefail
data=${1:?data dir}; originals=${2:?originals dir}; shift 2
common=(--arch custom --image-size 120 --epochs 6 --patience 2 --seed 42)
declare -A levers=(
  [base]=""
  [clahe]="--contrast clahe"
  [equalize]="--contrast equalize"
  [equalize-holdout]="--contrast equalize --hold-out-series NORMAL2-IM"
  [equalize-seed-43]="--contrast equalize --seed 43"
  [acquisition]="--augment acquisition"
  [clahe-acquisition]="--contrast clahe --augment acquisition"
  [label-smoothing]="--label-smoothing 0.1"
  [ema]="--ema"
  [base-seed-43]="--seed 43"
  # The two leading levers with the NORMAL2-IM series held out of training and validation: the card's
  # held_out_series is the specificity on a NORMAL series the model never saw.
  [base-holdout]="--hold-out-series NORMAL2-IM"
  [acquisition-holdout]="--augment acquisition --hold-out-series NORMAL2-IM"
  # Half of each class given the other class's sharpness (PNEUMONIA images in train/ are blurrier).
  [sharpness]="--match-sharpness"
  [sharpness-holdout]="--match-sharpness --hold-out-series NORMAL2-IM"
  [sharpness-seed-43]="--match-sharpness --seed 43"
  # Zooming in to a 65 % field of view (NORMAL images in train/ are framed more loosely).
  [framing]="--augment framing"
  [framing-holdout]="--augment framing --hold-out-series NORMAL2-IM"
  [normal-framing]="--augment normal-framing"
  # Input size: at 120 px the global shape of the image may dominate finer lung texture.
  [size-160]="--image-size 160"
  [size-224]="--image-size 224"
  # Soft labels between the classes (Zhang et al. 2018).
  [mixup]="--mixup 0.4"
  [mixup-holdout]="--mixup 0.4 --hold-out-series NORMAL2-IM"
)
order=(${@:-base clahe acquisition clahe-acquisition base-holdout acquisition-holdout base-seed-43
            label-smoothing ema sharpness sharpness-holdout sharpness-seed-43
            framing framing-holdout normal-framing size-160 size-224 mixup mixup-holdout equalize equalize-holdout equalize-seed-43})
models=()
for name in "${order[@]}"; do
  out=runs/levers/$name
  models+=(--model "$out")
  [[ -f $out/model.json ]] && continue
  # shellcheck disable=SC2086
  python -m pneumonia train "$data" "${common[@]}" ${levers[$name]} --out "$out" --resume
done
python -m pneumonia robustness "$data" "${models[@]}" --originals "$originals" --out runs/levers/robustness
