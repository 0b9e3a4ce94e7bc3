#!/usr/bin/env bash
# Backdoor + defence at small scale on a 2-core CPU (no GPU): the commands behind the
# I-BAU / fine-tuning / fine-pruning table of issue #6. Every heavy step takes the shared
# CPU lock. Usage: bash exp/ibau_cpu.sh [train|defend|small|all]   (from the repo root)
# Tables: python exp/summarize_defense.py results/ibau_exp
set -euo pipefail
export DATA_ROOT=${DATA_ROOT:-/work/shared/data}
LOCK=${LOCK:-/tmp/cpu.lock}
CK=${CHECKPOINT_DIR:-checkpoints}
RES=${RESULTS_DIR:-results}
SEEDS=${SEEDS:-"0 1 2"}
RT="--device cpu -NL"
step=${1:-all}

if [[ $step == train || $step == all ]]; then
  for s in $SEEDS; do  # BadNets 4x4 white patch, all-to-one, target 0, 10 % of 18k training images
    flock "$LOCK" python train.py --model smallcnn --dataset cifar10 --subset 20000 --epochs 8 \
      --batch-size 128 --optimizer adam --lr 0.001 --wd 0 --schedule cosine --seed "$s" \
      --attack badnets --poison-rate 0.1 --target 0 --out "$CK/bd_smallcnn_s$s.pt" $RT
  done
fi
if [[ $step == defend || $step == all ]]; then
  for s in $SEEDS; do  # 5000 clean test images; evaluation on the other 5000
    flock "$LOCK" python defense.py --poi_path "$CK/bd_smallcnn_s$s.pt" --method ibau \
      --n_clean 5000 --n_rounds 3 --K 5 --optim Adam --lr 0.001 --seed "$s" --out "$RES/ibau_exp" $RT
    for m in finetune fineprune; do
      flock "$LOCK" python defense.py --poi_path "$CK/bd_smallcnn_s$s.pt" --method $m \
        --n_clean 5000 --epochs 10 --optim Adam --lr 0.001 --seed "$s" --out "$RES/ibau_exp" $RT
    done
  done
fi
if [[ $step == small || $step == all ]]; then
  for s in $SEEDS; do  # 100 clean test images: one batch, so one outer step per round / epoch
    flock "$LOCK" python defense.py --poi_path "$CK/bd_smallcnn_s$s.pt" --method ibau \
      --n_clean 100 --n_rounds 50 --K 5 --optim Adam --lr 0.001 --seed "$s" --eval-every 5 \
      --out "$RES/ibau_exp" $RT
    for m in finetune fineprune; do
      flock "$LOCK" python defense.py --poi_path "$CK/bd_smallcnn_s$s.pt" --method $m \
        --n_clean 100 --epochs 50 --optim Adam --lr 0.001 --seed "$s" --eval-every 5 \
        --out "$RES/ibau_exp" $RT
    done
  done
fi
