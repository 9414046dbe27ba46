"""Analysis passes: annotate node.meta, never edit the graph."""
from passes.analysis.assign import Assign
from passes.analysis.classify import Classify
from passes.analysis.ranges import Ranges
from passes.analysis.sensitivity import Sensitivity

__all__ = ["Classify", "Ranges", "Sensitivity", "Assign"]
