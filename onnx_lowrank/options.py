"""Every user option, declared once: its Python keyword, its command-line flag, default, help and valid values.

The command line builds its flags from these declarations (`add_flags`) and passes them on to the API by keyword
(`keywords_for`); the API functions check their keywords against them (`checked`). Both use one message template,
naming the flag on the command line and the keyword in Python:

    --budget must be a fraction in (0, 1]. Got 1.5 instead.
    The 'budget' parameter of compress must be a fraction in (0, 1]. Got 1.5 instead.

A test checks every API default against its declaration, so a new option is declared here and named in the
signatures that take it; nothing else repeats it.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnx_lowrank.errors import InvalidOptionError, invalid
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.graph.runtime import DEFAULT_PROVIDER
from onnx_lowrank.stages.quantize import PER_CHANNEL_OPSET, QUANTIZE_MODES

__all__ = ["Option", "OPTIONS", "METHODS", "METRICS", "ALLOCATORS", "ALLOCATOR_CHOICES", "add_flags", "check",
           "checked", "keywords_for"]

METHODS = ("lowrank", "eliminate", "both")
"""lowrank: factorize layers; eliminate: narrow layers by dropping the channels the others reproduce (`elimination`,
calibration data needed); both: each layer is narrowed or factorized, whichever the one allocation prefers."""
METRICS = ("params", "flops", "latency")
"""Every cost model's name, in the order reports print them."""
ALLOCATORS = ("alds", "uniform", "energy")
"""The allocators that build one plan each (`stages.allocate`); `auto` judges their plans end to end."""
ALLOCATOR_CHOICES = ("auto", *ALLOCATORS)


@dataclass(frozen=True)
class Option:
    """One user option. `valid` (with `requirement`, the words for what it accepts) is checked on every value
    given, in Python or on the command line; None means 'not given' and is never checked."""

    name: str  # the Python keyword (and the argparse dest)
    help: str
    default: object = None
    requirement: str | None = None
    valid: Callable[[object], bool] | None = None
    flag: str | None = None  # default: --name-with-dashes
    short: str | None = None  # e.g. -q
    argparse: Mapping[str, object] = field(default_factory=dict)  # type, metavar, action, choices, ...
    more_flags: tuple[tuple[str, Mapping[str, object]], ...] = ()  # other flags filling the same keyword

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def label(self, caller: str | None) -> str:
        return self.cli_flag if caller is None else f"The {self.name!r} parameter of {caller}"

    def check(self, value: object, caller: str | None = None) -> None:
        if value is None or self.valid is None:
            return
        if not self.valid(value):
            raise invalid(self.label(caller), self.requirement, value)


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fraction(value: object) -> bool:
    return _number(value) and 0 < value <= 1


def _non_negative(value: object) -> bool:
    return _number(value) and 0 <= value < math.inf


def _whole_positive(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _regex(value: object) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


def _file_in_existing_folder(value: object) -> bool:
    path = Path(value)
    return not path.is_dir() and path.parent.is_dir()


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _budgets(text: str) -> list[float] | str:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        return text  # left for the check to refuse with the one message


_BOOL = {"action": "store_true"}
_FILE = "a file name in an existing folder (create the folder first)"

OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("budget", "fraction of the model's params (or FLOPs, or latency) to keep, in (0, 1]",
           requirement="a fraction in (0, 1]", valid=_fraction, argparse={"type": float, "metavar": "F"}),
    Option("target_error", "instead of a budget: the smallest model whose output error on the samples stays <= X",
           requirement="a number >= 0", valid=_non_negative, argparse={"type": float, "metavar": "X"}),
    Option("budgets", "fractions to keep, comma-separated (default 0.9,0.8,0.7,0.6,0.5)",
           default=(0.9, 0.8, 0.7, 0.6, 0.5), requirement="fractions in (0, 1] separated by commas, like 0.9,0.7",
           valid=lambda v: not isinstance(v, str) and len(v) > 0 and all(map(_fraction, v)),
           argparse={"type": _budgets, "metavar": "F,F,..."}),
    Option("metric", "what the budget counts: params, flops, or latency (the model's time in onnxruntime, measured "
           "per layer); default params", default="params", requirement=f"one of {', '.join(METRICS)}",
           valid=lambda v: v in METRICS, argparse={"choices": METRICS}),
    Option("allocator", "auto (default with calibration data): the best of alds/uniform/energy end to end on the "
           "calibration samples; alds (default without): min-max error over (k, rank); uniform/energy: classic k=1 "
           "baselines", requirement=f"one of {', '.join(ALLOCATOR_CHOICES)}", valid=lambda v: v in ALLOCATOR_CHOICES,
           argparse={"choices": ALLOCATOR_CHOICES}),
    Option("method", "both (default with calibration data): each layer narrowed or factorized, in one "
           "allocation; lowrank (default without): factorize layers; eliminate: narrow layers, dropping output "
           "channels the others reproduce (needs --calibration or --inputs)",
           requirement=f"one of {', '.join(METHODS)}", valid=lambda v: v in METHODS, argparse={"choices": METHODS}),
    Option("allocators", f"one or more of {','.join(ALLOCATOR_CHOICES)}, comma-separated (default: auto with "
           "calibration data, alds without)", flag="--allocator",
           requirement=f"names from {', '.join(ALLOCATOR_CHOICES)} separated by commas",
           valid=lambda v: not isinstance(v, str) and len(v) > 0 and all(n in ALLOCATOR_CHOICES for n in v),
           argparse={"type": _names, "metavar": "NAMES"}),
    Option("refit", "refit every decoder and bias on the calibration samples, in topological order", default=False,
           argparse=_BOOL),
    Option("inputs", ".npz keyed by input name (one batch), or a folder of .npz files (one sample each)",
           argparse={"metavar": "PATH"}),
    Option("input_shapes", "concrete shape for an input with dynamic dimensions (repeatable; NAME:1,3,224,224 works "
           "too)", flag="--input-shape", argparse={"action": "append", "metavar": "NAME:1x3x224x224"},
           more_flags=(("--input-shapes", {"action": "extend", "nargs": "+", "metavar": "NAME:1,3,224,224",
                                           "help": "several shapes after one flag, as onnxslim takes them (put it "
                                                   "after the model paths)"}),)),
    Option("calibration", "samples to calibrate on (same formats as --inputs): layers are decomposed and ranked by "
           "their output error on these real activations (default: the --inputs samples)",
           argparse={"metavar": "PATH"}),
    Option("weight_only", "ignore sample data for the decomposition: plain SVD of the weights", default=False,
           argparse=_BOOL),
    Option("shrinkage", "regularisation of the calibration statistics: A x their mean eigenvalue is added to every "
           "direction (default: adaptive per layer, Oracle Approximating Shrinkage from its rows and dimensions; "
           "layers with very few rows fall back to weight-only; a number fixes A for every layer)",
           default=DEFAULT_SHRINKAGE,
           requirement="a finite number >= 0", valid=_non_negative, argparse={"type": float, "metavar": "A"}),
    Option("threads", "onnxruntime intra-op threads to time with, as deployed (default: onnxruntime's, one per "
           "core)", requirement="a whole number >= 1", valid=_whole_positive, argparse={"type": int, "metavar": "N"}),
    Option("provider", f"onnxruntime execution provider to time with (default {DEFAULT_PROVIDER})",
           default=DEFAULT_PROVIDER, requirement="a provider name", valid=lambda v: isinstance(v, str) and v != "",
           argparse={"metavar": "NAME"}),
    Option("allow_slower", "skip timing layers: factorize layers even where the factorized form is not measured "
           "faster than the dense layer", default=False, argparse=_BOOL),
    Option("exclude", "leave layers whose name matches this pattern dense", requirement="a valid regular expression",
           valid=_regex, argparse={"metavar": "REGEX"}),
    Option("max_groups", "largest number of input-channel groups k to consider (default 8; 1 = plain SVD)", default=8,
           requirement="a whole number >= 1", valid=_whole_positive, argparse={"type": int, "metavar": "K"}),
    Option("rank_multiple", "only ranks that are multiples of N (8 or 16 suit onnxruntime's blocked conv kernels)",
           default=1, requirement="a whole number >= 1", valid=_whole_positive, argparse={"type": int, "metavar": "N"}),
    Option("quantize", "deploy as int8: plan, time and judge in onnxruntime's int8 form, quantize the result with "
           "onnxruntime's quantization and compare it with the original quantized the same way (int8 alone): int8 "
           "= static QDQ calibrated on the calibration samples (dynamic without them); int8-dynamic = dynamic "
           "quantization (transformers)",
           requirement=f"one of {', '.join(QUANTIZE_MODES)}", valid=lambda v: v in QUANTIZE_MODES,
           argparse={"choices": QUANTIZE_MODES}),
    Option("upgrade_opset", f"with --quantize: convert a model below opset {PER_CHANNEL_OPSET} to it first (onnx's "
           "version converter), for per-channel int8 weights", default=False, argparse=_BOOL),
    Option("verify", "skip running both models in onnxruntime", default=True, flag="--no-verify",
           argparse={"action": "store_false"}),
    Option("latency", "skip the latency measurement", default=True, flag="--no-latency",
           argparse={"action": "store_false"}),
    # command line only: what to write, and how loud
    Option("max_error", "exit 1 and write no model when an output's relative L2 error exceeds X",
           requirement="a number >= 0", valid=_non_negative, argparse={"type": float, "metavar": "X"}),
    Option("save_as_external_data", "write the weights to OUTPUT.data beside the model (automatic above 1.8 GB)",
           default=False, argparse=_BOOL),
    Option("report", "also write the report as JSON", requirement=_FILE, valid=_file_in_existing_folder, argparse={"metavar": "R.json"}),
    Option("plan_out", "also write the chosen plan as JSON", requirement=_FILE, valid=_file_in_existing_folder, argparse={"metavar": "P.json"}),
    Option("plan", "the plan to apply (written by --plan-out, or by hand)", argparse={"metavar": "P.json"}),
    Option("plot", "draw output error and latency against size", requirement=_FILE,
           argparse={"metavar": "FRONTIER.png"}),
    Option("quiet", "print nothing but errors", default=False, short="-q", argparse=_BOOL),
)}

_CONTRADICTIONS = (
    ("calibration", "weight_only", "contradict each other; give one or the other"),
    ("budget", "target_error", "are two goals; give one or the other"),
)


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Sequence[str],
              required: bool = False) -> None:
    """Add the flags of the options `names` to `parser` (or to a mutually exclusive group)."""
    for name in names:
        option = OPTIONS[name]
        flags = [option.short, option.cli_flag] if option.short else [option.cli_flag]
        settings = {"dest": option.name, "help": option.help, **option.argparse}
        if option.argparse.get("action") not in ("append", "extend"):
            settings.setdefault("default", option.default)
        else:
            settings["default"] = []
        if required:
            settings["required"] = True
        parser.add_argument(*flags, **settings)
        for flag, extra in option.more_flags:
            parser.add_argument(flag, dest=option.name, **extra)


def check(values: Mapping[str, object], caller: str | None = None) -> None:
    """Check every declared option in `values` (keyword -> value), and that no two contradict each other. With a
    `caller` the messages name Python keywords; without, command-line flags."""
    for name, value in values.items():
        if name in OPTIONS:
            OPTIONS[name].check(value, caller)
    for first, second, why in _CONTRADICTIONS:
        if values.get(first) not in (None, False) and values.get(second) not in (None, False):
            one, other = (OPTIONS[first].cli_flag, OPTIONS[second].cli_flag) if caller is None else (first, second)
            raise InvalidOptionError(f"{one} and {other} {why}.")
    if values.get("upgrade_opset") and values.get("quantize") is None:
        raise InvalidOptionError(f"{OPTIONS['upgrade_opset'].cli_flag if caller is None else 'upgrade_opset'} goes "
                                 "with --quantize (it converts the model for per-channel int8 weights); add it or "
                                 "drop this one.")
    if values.get("max_error") is not None and values.get("verify") is False:
        raise InvalidOptionError("--max-error needs verification, which --no-verify turns off; drop one of them.")


def checked(function: Callable) -> Callable:
    """Check the declared options among `function`'s arguments on every call, naming its keywords in messages."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidOptionError(f"{function.__name__}: {exc}.") from None
        check({name: value for name, value in bound.arguments.items() if name in OPTIONS}, function.__name__)
        return function(*args, **kwargs)

    return wrapper


def keywords_for(function: Callable, values: Mapping[str, object]) -> dict[str, object]:
    """The declared options in `values` that `function` takes as keywords: how the command line calls the API."""
    parameters = inspect.signature(function).parameters
    return {name: value for name, value in values.items() if name in OPTIONS and name in parameters}
