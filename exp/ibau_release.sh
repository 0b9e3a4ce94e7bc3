#!/usr/bin/env bash
# I-BAU on the I-BAU authors' own backdoored models (DATA_ROOT/ibau_release) and on this
# repository's SmallCNN: the commands behind docs/ibau.md's tables (issue 13). 2-core CPU.
# Usage: bash exp/ibau_release.sh [ablation|defaults|own|small|all]   (from the repo root)
# Env: SEEDS (default "0 1 2"), ABL_ROUNDS (3), ROWS (ablation rows, default all five)
# Tables: python exp/summarize_ibau.py results/ibau_release/<step> --rounds 1 3 5
set -euo pipefail
export DATA_ROOT=${DATA_ROOT:-/work/shared/data}
LOCK=${LOCK:-/tmp/cpu.lock}
RES=${RESULTS_DIR:-results}/ibau_release
CK=${CHECKPOINT_DIR:-checkpoints}
REL=$DATA_ROOT/ibau_release
SEEDS=${SEEDS:-"0 1 2"}
ABL_ROUNDS=${ABL_ROUNDS:-3}
RT="--device cpu -NL"
step=${1:-all}

defend() {  # defend OUT TAG FLAGS...: one defense.py run, results in $RES/OUT/TAG.json
  local out=$1 tag=$2; shift 2
  flock "$LOCK" python defense.py "$@" --tag "$tag" --out "$RES/$out" \
    --save "$CK/ibau_release/$out/$tag.pt" $RT
}

if [[ $step == ablation || $step == all ]]; then
  # each of this repository's departures switched back to the release's choice alone, then all
  # together (the release's defense.py), $ABL_ROUNDS rounds; the defaults' own rows come from
  # the `defaults` step (rounds 1 and 3 of the same run). --min-perturbed 0 alone is the same
  # run bit for bit at batch 100 (int(0.01·100) = 1; tests/test_ibau.py checks it). `step`
  # is this repository's earlier projection, the one the issue found failing.
  M="--poi_path $REL/badnets_8_02_ckpt.pth --n_rounds $ABL_ROUNDS"
  for s in $SEEDS; do
    for row in ${ROWS:-one-percent constant-lr unbounded release-cli step-projection}; do
      case $row in
        one-percent) f="--perturb-frac 0.01" ;;       # 1 % of every outer batch gets δ
        constant-lr) f="--lr-half-life 0" ;;              # no decay over the rounds
        unbounded) f="--radius 0" ;;                  # δ never projected
        release-cli) f="--radius 0 --min-perturbed 0 --perturb-frac 0.01 --lr-half-life 0" ;;
        step-projection) f="--projection step" ;;     # projected after every step
        *) echo "unknown ablation row $row" >&2; exit 2 ;;
      esac
      defend ablation "${row}_seed$s" $M --seed "$s" $f
    done
  done
fi
if [[ $step == defaults || $step == all ]]; then
  for s in $SEEDS; do  # no flag but the seed: what a new user runs
    defend defaults "cifar10-release_seed$s" --poi_path "$REL/badnets_8_02_ckpt.pth" --seed "$s"
    defend defaults "gtsrb-release_seed$s" --poi_path "$REL/gtsrbbadnets_8_02_ckpt.pth" \
      --dataset gtsrb --seed "$s"
  done
fi
if [[ $step == own || $step == all ]]; then
  for s in $SEEDS; do  # the README's BadNets SmallCNN (exp/ibau_cpu.sh train), defaults
    [[ -f "$CK/bd_smallcnn_s$s.pt" ]] || bash exp/ibau_cpu.sh train
    defend own "smallcnn-badnets_seed$s" --poi_path "$CK/bd_smallcnn_s$s.pt" --seed "$s"
  done
fi
if [[ $step == small || $step == all ]]; then
  for d in 0 1 2 3 4; do  # the paper's 100 clean images: one batch, so one outer step a round
    defend small "n100-draw${d}_seed0" --poi_path "$REL/badnets_8_02_ckpt.pth" --n_clean 100 \
      --n_rounds 50 --eval-every 10 --seed 0 --data-seed "$d"
  done
fi
