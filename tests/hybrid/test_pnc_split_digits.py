"""Progress & Compress on split_digits task-IL next to online EWC and naive fine-tuning (the
setting A of docs/methods/pnc.md, seed 0)."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from cl_plugins.hybrid.pnc import ProgressCompressPlugin
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

from test_pnc import strategy


def forgetting(rows):
    """Mean over all tasks but the last of (best accuracy on it - final accuracy on it)."""
    n = len(rows)
    return sum(max(r[j] for r in rows[j:]) - rows[-1][j] for j in range(n - 1)) / (n - 1)


def accuracy_rows(plugin, seed, epochs=2):
    st, info, _ = strategy([plugin], seed=seed, epochs=epochs, momentum=0.9, metrics=True,
                           hidden=(32, 32))
    tests, rows = list(info.benchmark.test_stream), []
    for e, exp in enumerate(info.benchmark.train_stream):
        st.train(exp)
        res = st.eval(tests[:e + 1])
        rows.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{te.task_label:03d}/"
                         f"Exp{te.current_experience:03d}"] for te in tests[:e + 1]])
    return rows


class Nothing(SupervisedPlugin):
    """Naive fine-tuning, as a plugin list entry."""


def test_split_digits_task_il_next_to_online_ewc():
    """split_digits task-IL, seed 0, SGD momentum 0.9, 2 epochs (docs/methods/pnc.md): P&C
    with mean-normalised Fishers keeps final accuracy > 0.9 and forgets far less than the same
    run without its online-EWC term (ewc_lambda=0: distillation alone, measured 0.039 against
    0.007) and than naive fine-tuning; online EWC, measured beside it, also forgets less than
    naive. (Across seeds and settings the comparison with online EWC is mixed: see the notes.)"""
    pnc = accuracy_rows(ProgressCompressPlugin(fisher_norm="mean", ewc_lambda=0.2), seed=0)
    no_penalty = accuracy_rows(ProgressCompressPlugin(fisher_norm="mean", ewc_lambda=0.0),
                               seed=0)
    ewc = accuracy_rows(OnlineEWCPlugin(), seed=0)
    naive = accuracy_rows(Nothing(), seed=0)
    assert sum(pnc[-1]) / len(pnc[-1]) > 0.9
    assert forgetting(pnc) < 0.5 * forgetting(no_penalty)
    assert forgetting(pnc) < 0.5 * forgetting(naive)
    assert forgetting(ewc) < forgetting(naive)
