"""Rewrite passes: edit the graph from the annotations written by the analysis passes."""
from passes.rewrite.cast_weights import CastWeights
from passes.rewrite.fold_casts import FoldCasts
from passes.rewrite.insert_casts import InsertCasts

__all__ = ["InsertCasts", "FoldCasts", "CastWeights"]
