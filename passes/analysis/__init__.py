"""Stage 2, analysis: annotate node.meta (op class, ranges, sensitivity, the dtype of each node); never edit."""
from rewriter.passes.analysis.assign import Assign
from rewriter.passes.analysis.classify import Classify
from rewriter.passes.analysis.lowering import BudgetLowering
from rewriter.passes.analysis.ranges import Ranges
from rewriter.passes.analysis.sensitivity import Sensitivity
from rewriter.passes.analysis.transfer import TransferMeasurements

__all__ = ["Classify", "Ranges", "Sensitivity", "BudgetLowering", "Assign", "TransferMeasurements"]
