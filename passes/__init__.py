"""Graph passes of the rewriter: analysis passes annotate node.meta, rewrite passes edit the graph."""
from passes.infra import AnalysisPass, Pass, PassManager, PassResult

__all__ = ["Pass", "AnalysisPass", "PassResult", "PassManager"]
