"""The check of methods that need task labels (registry header ``NEEDS_TASK_LABELS = True``).

Such a method keeps something per task label (a network, a head, a mask). On a stream without
task labels (class- or domain-incremental: every experience has task label 0) it would silently
train one thing for all experiences, i.e. behave like another method. Its first training hook
calls :func:`require_task_labels` instead, before anything is trained on the experience.
"""

from __future__ import annotations

from typing import Iterable, List


def _labels(experience) -> List[int]:
    return sorted({int(t) for t in experience.task_labels})


def require_task_labels(method: str, experience, trained: Iterable[int]) -> List[int]:
    """Raise ``ValueError`` if ``experience``'s training stream has no task labels: it has several
    experiences that all share one task label, or ``experience`` repeats a task label in
    ``trained`` (those already trained on). Returns the experience's task labels."""
    labels = _labels(experience)
    try:
        stream = experience.origin_stream
        stream_labels = [_labels(e) for e in stream] if len(stream) > 1 else []
    except (AttributeError, TypeError, NotImplementedError):  # no stream, or a lazy one
        stream_labels = []
    hint = (f"{method} needs task labels: it keeps one model part per task label and picks it "
            "by the label. Use a task-incremental stream (benchmark.scenario=task, Avalanche's "
            "return_task_id=True)")
    if stream_labels and all(ls == stream_labels[0] and len(ls) == 1 for ls in stream_labels):
        raise ValueError(f"{hint}; the training stream's {len(stream_labels)} experiences all "
                         f"have task label {stream_labels[0][0]}.")
    repeated = sorted(set(labels) & {int(t) for t in trained})
    if repeated:
        raise ValueError(f"{hint}; training experience {experience.current_experience} has task "
                         f"label(s) {repeated}, already trained on.")
    return labels
