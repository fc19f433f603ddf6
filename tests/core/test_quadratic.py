"""QuadraticPenalty.loss (collapsed, one autograd node) against the term-by-term expression."""

import pytest
import torch

from cl_plugins.core.quadratic import QuadraticPenalty


def _params(g, dtype=torch.float64):
    return {"a": torch.randn(5, 4, generator=g, dtype=dtype).requires_grad_(),
            "b": torch.randn(7, generator=g, dtype=dtype).requires_grad_()}


def _terms(g, k, signed=False):
    out = []
    for _ in range(k):
        imp = {"a": torch.rand(5, 4, generator=g, dtype=torch.float64),
               "b": torch.rand(7, generator=g, dtype=torch.float64)}
        if signed:
            imp = {n: t - 0.5 for n, t in imp.items()}
        anc = {"a": torch.randn(5, 4, generator=g, dtype=torch.float64),
               "b": torch.randn(7, generator=g, dtype=torch.float64)}
        out.append((imp, anc))
    return out


def _value_and_grads(fn, params):
    v = fn(params)
    return v.item(), torch.autograd.grad(v, list(params.values()))


@pytest.mark.parametrize("mode,k,signed", [
    ("separate", 1, False), ("separate", 3, False), ("accumulate", 3, False),
    ("online", 3, False), ("accumulate", 2, True),  # one signed term (SI, RWalk)
    ("separate", 3, True),  # several signed terms: evaluated term by term
])
def test_collapsed_loss_equals_the_term_by_term_sum(mode, k, signed):
    g = torch.Generator().manual_seed(3)
    pen = QuadraticPenalty(coef=0.7, mode=mode, gamma=0.8)
    for imp, anc in _terms(g, k, signed):
        pen.add(imp, anc)
    params = _params(g)
    value, grads = _value_and_grads(pen.loss, params)
    ref_value, ref_grads = _value_and_grads(pen.reference_loss, params)
    assert ref_value != 0
    assert value == pytest.approx(ref_value, rel=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the analytic gradient used by SI agrees too
    analytic = pen.gradient({n: p.detach() for n, p in params.items()})
    for (n, _), b in zip(params.items(), ref_grads):
        torch.testing.assert_close(analytic[n], b, rtol=1e-10, atol=1e-12)


def test_cache_follows_new_terms_and_state_loading():
    g = torch.Generator().manual_seed(4)
    pen = QuadraticPenalty(coef=1.0, mode="separate")
    terms = _terms(g, 2)
    pen.add(*terms[0])
    params = _params(g)
    first = pen.loss(params).item()
    pen.add(*terms[1])  # must invalidate the collapsed term
    assert pen.loss(params).item() == pytest.approx(pen.reference_loss(params).item(), rel=1e-12)
    assert pen.loss(params).item() != pytest.approx(first)
    other = QuadraticPenalty(coef=1.0, mode="separate")
    other.add(*terms[0])
    assert other.loss(params).item() == pytest.approx(first, rel=1e-12)
    other.load_state_dict(pen.state_dict())
    assert other.loss(params).item() == pytest.approx(pen.loss(params).item(), rel=1e-12)


def test_float32_parameters_with_float64_importances_keep_their_dtype():
    g = torch.Generator().manual_seed(5)
    pen = QuadraticPenalty(coef=2.0)
    pen.add(*_terms(g, 1)[0])
    params = _params(g, torch.float32)
    value = pen.loss(params)
    grads = torch.autograd.grad(value, list(params.values()))
    assert value.dtype == torch.float32 and all(gr.dtype == torch.float32 for gr in grads)
    assert value.item() == pytest.approx(pen.reference_loss(params).item(), rel=1e-5)


def test_subtract_gradient_reuses_the_step_and_notices_a_parameter_update():
    g = torch.Generator().manual_seed(6)
    pen = QuadraticPenalty(coef=1.5, mode="separate")
    for imp, anc in _terms(g, 2):
        pen.add(imp, anc)
    params = _params(g)
    pen.loss(params)  # records W (theta - c) for this step
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    pen.subtract_gradient(params, out)
    ref = pen.gradient({n: p.detach() for n, p in params.items()})
    for n in params:
        torch.testing.assert_close(out[n], -ref[n], rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # an optimizer step after loss(): the recorded values are stale
        params["a"].add_(1.0)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    pen.subtract_gradient(params, out)
    ref = pen.gradient({n: p.detach() for n, p in params.items()})
    for n in params:
        torch.testing.assert_close(out[n], -ref[n], rtol=1e-10, atol=1e-12)
