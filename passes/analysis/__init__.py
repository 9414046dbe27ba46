"""Analysis passes: annotate node.meta, never edit the graph."""
from passes.analysis.assign import Assign
from passes.analysis.classify import Classify

__all__ = ["Classify", "Assign"]
