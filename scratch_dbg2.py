import torch, transformers
from tools.autocast_regions_bench import build
from rewriter import autocast_regions
import transformers.models.llama.modeling_llama as ml
model, args = build("llama", 64, 2, True, torch.device("cpu"))
orig = getattr(ml, "maybe_autocast", None)
calls = []
with autocast_regions.visible():
    f = ml.maybe_autocast
    def spy(*a, **k):
        r = f(*a, **k); calls.append((a, k, type(r).__name__)); return r
    ml.maybe_autocast = spy
    ep = torch.export.export(model, args, strict=False)
    ml.maybe_autocast = f
print(calls)
print([n.target for n in ep.graph.nodes if "autocast" in str(n.target)])
print(ep.graph_module.code[:3000])
print("TOP", [str(n.target) for n in ep.graph.nodes if "wrap" in str(n.target)])
for name, m in ep.graph_module.named_modules():
    if name: print(name, [str(n.target) for n in m.graph.nodes if "wrap" in str(n.target)])
