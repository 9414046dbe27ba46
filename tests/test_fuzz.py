"""Property test: random small graphs over the ops the op table knows (tools/fuzz.py), both capture
paths, fp16/bf16/fp8. Every conversion converts or refuses with a RewriterError, runs, stays finite
where fp32 is, keeps the output dtype, stays within the autocast error budget, is idempotent and
leaves the input model unchanged (tools/fuzz.check). Bounded to about 30 s on one core; the larger
run is `python -m tools.fuzz --graphs 1000 --out tools/results/fuzz.json`.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from tools import fuzz  # noqa: E402

_OP = st.tuples(st.sampled_from(fuzz.UNARY + fuzz.BINARY), st.integers(0, 63), st.booleans())


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=st.lists(_OP, min_size=1, max_size=6), fallback=st.booleans(),
       precision=st.sampled_from(["fp16", "bf16", "fp8"]), seed=st.integers(0, 2 ** 20))
def test_random_graphs_convert_safely(spec, fallback, precision, seed):
    model = fuzz.FuzzNet(spec, fallback, seed).eval()
    x = torch.randn(2, 4, fuzz.D, generator=torch.Generator().manual_seed(seed))
    outcome, detail = fuzz.check(model, x, precision)
    assert outcome in ("ok", "refused"), f"{outcome}: {detail} (spec={spec}, fallback={fallback})"


def test_check_detects_a_mutating_conversion(monkeypatch):
    """The oracle itself: a convert that edits its input is reported as a mutation."""
    import rewriter

    model = fuzz.FuzzNet([("linear", 0, False)], False, 0).eval()
    real = rewriter.convert

    def mutating(m, *args, **kwargs):
        out = real(m, *args, **kwargs)
        with torch.no_grad():
            m.linears[0].weight.mul_(2)
        return out

    monkeypatch.setattr(rewriter, "convert", mutating)
    assert fuzz.check(model, torch.randn(2, 4, fuzz.D), "bf16")[0] == "mutation"
