import warnings, torch, transformers
warnings.simplefilter("always")
from tools.autocast_regions_bench import build
import rewriter
from rewriter.autocast_regions import regions_of
from rewriter.backends.torch_backend import graph_module_of
from rewriter import meta
model, args = build("llama", 64, 2, True, torch.device("cpu"))
conv = rewriter.convert(model, *args, precision="bf16")
gm = graph_module_of(conv)
print(transformers.__version__, "regions", regions_of(gm))
print(gm.meta.get(meta.INFO) if hasattr(gm, "meta") else None)
