"""onnx-lowrank: compress ONNX models after export by grouped low-rank factorization under one global budget.

>>> import onnx_lowrank
>>> model, report = onnx_lowrank.compress("model.onnx", budget=0.5, input_shapes=["x:1x3x224x224"])  # doctest: +SKIP
"""

from onnx_lowrank.stages.analyze import Analysis
from onnx_lowrank.api import analyze, apply, compress, plan
from onnx_lowrank.errors import BudgetError, InputDataError, InvalidModelError, InvalidOptionError, LowRankError
from onnx_lowrank.plan import Plan
from onnx_lowrank.stages.report import Report
from onnx_lowrank.stages.verify import Verification

__version__ = "0.1.0"

__all__ = [
    "compress",
    "analyze",
    "plan",
    "apply",
    "Analysis",
    "Plan",
    "Report",
    "Verification",
    "LowRankError",
    "InvalidModelError",
    "InvalidOptionError",
    "BudgetError",
    "InputDataError",
]
