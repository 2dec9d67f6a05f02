"""The one exception family of onnx-lowrank.

Broken input (a model we cannot read, an option out of range, a budget that cannot be met) raises a subclass of
`LowRankError`; the CLI turns it into one line on stderr and exit code 2. A layer we merely cannot compress is not an
error: it is skipped, with a reason, in the report.
"""

from __future__ import annotations

__all__ = ["LowRankError", "InvalidModelError", "InvalidOptionError", "BudgetError", "SlowerModelError",
           "InputDataError", "invalid"]


class LowRankError(Exception):
    """Base class: every error onnx-lowrank raises on purpose."""


class InvalidModelError(LowRankError):
    """The model file or ModelProto cannot be read, checked or run."""


class InvalidOptionError(LowRankError, ValueError):
    """An option (budget, metric, plan, shape string, ...) is malformed or out of range."""


class BudgetError(LowRankError):
    """The requested budget cannot be reached with the candidate factorizations of this model."""


class SlowerModelError(BudgetError):
    """With the never-slower guard on, every plan at the budget was measured slower than the original beyond noise:
    the budget cannot be reached without breaking the promise, so nothing is written."""


class InputDataError(LowRankError):
    """Input or calibration data does not match the model (missing names, wrong shapes or dtypes)."""


def invalid(label: str, requirement: str, value: object) -> InvalidOptionError:
    """The one message for a value out of range, in scikit-learn's words: '<label> must be <requirement>. Got
    <value> instead.', where the label is a flag (--budget) or "The 'budget' parameter of compress"."""
    return InvalidOptionError(f"{label} must be {requirement}. Got {value!r} instead.")
