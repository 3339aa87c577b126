"""Estimates before and around training: parameter counts, memory, method recommendations, run tables.

``params`` counts a method's trainable parameters on a weightless (meta-device) model through the
engine; ``memory`` and ``activations`` estimate training memory with the formulas in their
docstrings; ``recommend`` ranks methods for a GPU budget from those estimates; ``table`` writes the
results of several runs (``peftkit sweep`` / ``compare``).
"""
from peftkit.analysis.memory import MemoryEstimate, MemoryOptions, compare, full_finetune, with_method
from peftkit.analysis.params import ParamCount, count
from peftkit.analysis.recommend import Constraints, recommend
from peftkit.analysis.shapes import NAMED_SHAPES, ModelSource, build_meta, source

__all__ = ["MemoryEstimate", "MemoryOptions", "compare", "full_finetune", "with_method", "ParamCount", "count",
           "Constraints", "recommend", "NAMED_SHAPES", "ModelSource", "build_meta", "source"]
