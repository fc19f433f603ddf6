#!/bin/bash
# Bring every row of RESULTS.md up to date and run what the protocols still lack, in two lanes of
# one thread each (the 2-core machine; start both, each in the background):
#
#     bash experiments/campaign.sh A DATA_ROOT     # issue 17's D1/D2, S2, S1, the replay and
#                                                  # penalty protocols, P1, R2, then P2 in full
#     bash experiments/campaign.sh B DATA_ROOT     # issue 15's S2 domain-IL rows, the stale
#                                                  # rows of S2's distillation, H2 and A1-A5,
#                                                  # then lane A's stale rows from the other
#                                                  # end; then the generative and hybrid
#                                                  # protocols (S3, B1-GR, H1-H3) and the
#                                                  # architectural ones (A4/A5 permuted)
#
# Stale rows come before fills in both lanes: issue 14 closes only when RESULTS.md has no stale
# row, and it comes before the issues that the fills serve (15's P2 grid, 18, 19). Two lanes may
# run the same rerun: each seed is claimed by the process that runs it, and the other lane skips
# it (the last `stale` of each lane picks up whatever a stop left behind).
#
# Every step can be run again after a stop: rerun_stale.py reruns only the seeds whose result is
# stale (and resumes from checkpoints), reproduce.py --skip-finished runs only what has no
# finished result with the same settings. Cheap and issue-closing steps come first; the last
# step of each lane reruns whatever is still stale. Run it in a worktree at a fixed commit, then
# `python experiments/rerun_stale.py --collect WORKTREE && python experiments/reproduce.py --table`
# in the checkout (rerun_stale.py's docstring). Costs are CPU-hours on that machine, from the
# stored results' train times.
set -u
LANE=${1:?lane A or B}
DATA=${2:?data root}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The CPU kernels of the machines behind every stored row (AVX2): torch dispatches AVX-512
# kernels where the CPU has them, and so does MKL, and their float rounding differs. These two
# settings give back the stored matrices exactly on an AVX-512 machine; MKL_CBWR=AVX2 does not
# (it takes another MKL path). Measured 2026-12-07: docs/architecture.md, "Which rows a code
# change makes stale".
export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
# numpy's OpenBLAS (the QP of GEM and Avalanche's GEM) picks SkylakeX kernels on such a machine,
# with other bits than Haswell's; B1-GEM avalanche_gem seed 0 moved 93.45 -> 93.82 under the two
# settings above alone, and is identical to the stored run with this one (2026-12-07)
export OPENBLAS_CORETYPE=Haswell
cd "$(dirname "$0")/.."
stale() { step python experiments/rerun_stale.py --jobs 1 --data-root "$DATA" "$@"; }
fill() { step python experiments/reproduce.py "$@" --skip-finished --data-root "$DATA"; }
step() { echo "== $(date -u +%FT%T) $*"; "$@"; }

case $LANE in
A)
    # Issue 15's S2 rows on seeds 2-11 first (naive, EWC, SI, LwF; joint, ensemble), rerun
    # where stale (aac0819 staled every row) and filled where missing: class- and task-IL here,
    # domain-IL in lane B (about 2 min a run on 2026-12-07)
    stale --protocols S2 --variants class,task --methods naive,ewc,si,lwf
    fill S2 --variant class --only=naive,ewc,si,lwf,joint
    fill S2 --variant task --only=naive,ewc,si,lwf,joint,ensemble   # ensemble: task-IL only
    stale --protocols D1                                  # 1.1 h
    stale --protocols D2                                  # 1.4 h
    stale --protocols S2 --skip hints,relational_kd,erg_kd,avalanche_feature_distillation
    stale --protocols S1,S1-reg                           # 4 h
    fill S1                                               # joint and cumulative: 1.5 h
    stale --protocols B1-SI-RWALK,B1-GEM,B1-AGEM,G1,R1,S1-replay   # 10 h
    stale --protocols P1,R2                               # 14 h
    stale --protocols P2                                  # the 1000-iteration cut
    # 5000 it/task, the six methods issue 15 names (not avalanche_online_ewc): ~35 h
    for v in task domain; do
        fill P2 --variant "$v" --seeds 0,1,2 --only=naive,ewc,online_ewc,si,avalanche_ewc,avalanche_si
    done
    for v in class domain task; do fill S2 --variant "$v"; done   # S2's other entries: ~11 h
    ;;
B)
    stale --protocols S2 --variants domain --methods naive,ewc,si,lwf   # issue 15's (lane A:
    fill S2 --variant domain --only=naive,ewc,si,lwf,joint              # class and task)
    # then task-IL's with lane A: the claims let two lanes share one fill, each run once
    fill S2 --variant task --only=naive,ewc,si,lwf,joint,ensemble
    stale --protocols S2 --methods hints,relational_kd,erg_kd,avalanche_feature_distillation
    stale --protocols H2
    stale --protocols A1,A2,A3,A4,A5                      # 3 h
    # lane A's stale protocols, from the end of its list, so that the lanes meet in the middle
    stale --protocols P2
    stale --protocols R2,P1
    stale --protocols S1-replay,R1,G1,B1-AGEM,B1-GEM,B1-SI-RWALK
    stale --protocols S1-reg,S1
    stale --protocols D2,D1
    fill H2 --variant task                                # 2 h
    for v in class domain task; do fill S3 --variant "$v"; done   # DGR: ~5 h
    fill B1-GR                                            # 2 h
    for v in domain class; do fill S2 --variant "$v" --only=dgr; done   # issue 18's S2 DGR
    fill H3                                               # 4 h
    fill H1                                               # 2 h
    fill H2 --variant p2_1k --seeds 0,1,2                 # 3 h
    fill A4 --variant permuted                            # P1's settings: ~10 h
    fill A5 --variant permuted                            # ~10 h
    ;;
*) echo "lane must be A or B" >&2; exit 2 ;;
esac
stale                                                     # whatever is still stale
echo "== $(date -u +%FT%T) lane $LANE done"
