#!/bin/bash
# Regenerates the speed tables under results/speed/ (copied into RESULTS.md by
# experiments/reproduce.py --table). Pause other work on the machine first. Data root: $CL_DATA_ROOT.
# Usage: speed_tables.sh [TABLE...]  (TABLE: projection, penalties, replay; default all)
ONLY="$*"
run() {  # file title intro cmd...
  local file=$1 title=$2 intro=$3; shift 3
  local name=${file#*_}; name=${name%.md}
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  {
    echo "### $title"; echo; echo "$intro"; echo
    for cmd in "$@"; do
      echo "\`${cmd}\`"; echo
      eval "${cmd//DATA/${CL_DATA_ROOT:-data}}" 2>/dev/null | grep "^|"
      echo
    done
  } > "results/speed/$file.tmp" && mv "results/speed/$file.tmp" "results/speed/$file"
}
NOTE="Measured $(date +%F) on the 2-core CPU with the machine otherwise idle (background runs paused), one thread; each method's ratio uses a naive run measured right before it in the same process (the naive row shows the first one)."
run 1_projection.md "Projection (issue 3): P1 MLP 784-100-100-10 (batch 10) and LeNet on Split MNIST (batch 10)" "$NOTE End-of-experience work: statistics, eigendecompositions/SVDs, RLS pass, stored gradients. On the P1 MLP at batch 10 the aims (1.5x naive for NSCL and GPM, 2x for RGO) are out of reach by arithmetic, not overhead: naive's whole step (forward and backward of 10 samples) is about 2.7 M multiply-adds, while projecting the first layer's 100 x 784 gradient onto a rank-k basis (or its complement, whichever is smaller) costs 2 x 100 x 784 x k, already as much for k = 17; on the conv net, where a step does more work per parameter, all three are within the aims. OGD reads its n_params x m stored directions every step (m = 200 per task; here m = 400): its cost grows with the tasks seen." \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/saha2021_gpm_permuted_mnist.yaml --methods gpm,nscl,rgo,ogd --experiences 3 --set strategy.train_iterations=400 --set strategy.epochs=1 --set benchmark.samples_per_task=6000 --data-root DATA" \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/speed_conv_split_mnist.yaml --methods gpm,nscl,rgo,ogd --experiences 3 --set strategy.train_iterations=400 --data-root DATA"
run 2_penalties.md "Penalties (issue 4): S1 MLP 1024-400-400, batch 128" "$NOTE End-of-experience work is the importance computation (Fisher / MAS over the task's ~12,000 samples, SCP's slices); SI and RWalk accumulate during training. Avalanche's RWalk raises KeyError when a new task head appears while its iteration counter is not a multiple of delta_t (its per-interval buffers, which must hold every parameter, are rebuilt only at those checkpoints; here 4 x 94 = 376 steps per experience): it runs in multi-head settings only when every experience's step count is a multiple of delta_t (B1: 1,880), so the two RWalks are compared in domain-IL." \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/hsu2018_split_mnist_regularization.yaml --methods ewc,online_ewc,si,mas,rwalk,scp,lwf,avalanche_ewc,avalanche_online_ewc,avalanche_si,avalanche_mas,avalanche_lwf --experiences 2 --data-root DATA" \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/hsu2018_split_mnist_regularization.yaml --methods rwalk,avalanche_rwalk --experiences 2 --set benchmark.scenario=domain --data-root DATA"
run 3_replay.md "Replay (issue 5): R1 MLP 784-100-100 (batch 128), B1 MLPs (batch 10), S1 MLP-400 class-IL (batch 128)" "$NOTE Buffer bytes per sample: the plugin's ReplayBuffer storage / capacity (float32 inputs by default; x_dtype uint8 with x_range stores 784 + 8 bytes per MNIST image); Avalanche's plugins keep dataset references, shown as –. Our ER draws its memory batch inside the step (counted); Avalanche's ReplayPlugin draws it in its dataloader (not counted)." \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/buzzega2020_der_rotated_mnist.yaml --methods er-500,der-500,derpp-500,mir,avalanche_er-500,avalanche_der-500,avalanche_derpp-500,avalanche_mir --experiences 2 --set benchmark.test_samples_per_task=100 --data-root DATA" \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/b1_permuted_mnist_gem.yaml --methods gem,avalanche_gem --experiences 3 --set strategy.train_iterations=500 --set benchmark.test_samples_per_task=100 --data-root DATA" \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/b1_permuted_mnist_agem.yaml --methods agem,avalanche_agem --experiences 3 --set strategy.train_iterations=500 --set benchmark.test_samples_per_task=100 --data-root DATA" \
 "OMP_NUM_THREADS=1 python experiments/speed.py --config experiments/configs/hsu2018_split_mnist_replay.yaml --methods icarl,avalanche_icarl,naive-rehearsal-1100 --experiences 2 --set benchmark.scenario=class --data-root DATA"

echo done
