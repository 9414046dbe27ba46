"""Graph passes of the rewriter: analysis passes annotate node.meta, rewrite passes edit the graph."""
# rewriter's package init imports the pipeline, which imports these passes, which import rewriter.errors
# and rewriter.meta: initialise rewriter first so `import passes.x` works before `import rewriter` too
# (else passes.infra is half-initialised when assign.py imports it).
import rewriter  # noqa: F401  (import order, see above)
from passes.infra import AnalysisPass, Pass, PassManager, PassResult

__all__ = ["Pass", "AnalysisPass", "PassResult", "PassManager"]
