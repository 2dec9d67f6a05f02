"""`onnx-lowrank` on the command line: a thin layer over the Python API.

Exit codes: 0 success (also when there is nothing to compress), 1 verification error above --max-error (the model
is then not written), 2 bad input or usage, with one line on stderr and no output file written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, api
from .allocate import ALLOCATORS
from .cost_models import METRICS
from .projection import DEFAULT_SHRINKAGE
from .runtime import DEFAULT_PROVIDER
from .errors import InvalidOptionError, LowRankError
from .load import check_output_path, save_model
from .plan import Plan
from .plot import plot_frontier
from .report import Report, render, render_analysis, render_sweep
from .sweep import parse_budgets, sweep

EXIT_OK, EXIT_VERIFICATION, EXIT_USAGE = 0, 1, 2
ALLOCATOR_CHOICES = ("auto", *ALLOCATORS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console = _console(args.quiet)
    try:
        return args.run(args, console)
    except LowRankError as exc:
        print(f"onnx-lowrank: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; nothing was written.", file=sys.stderr)
        return 130


def _console(quiet: bool) -> Console:
    """Tables on stdout; when stdout is not a terminal, wide enough that columns are not cut."""
    console = Console(quiet=quiet)
    return console if console.is_terminal else Console(quiet=quiet, width=160)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-lowrank",
        description="Compress the Conv/Gemm/MatMul layers of an ONNX model by grouped low-rank factorization.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-lowrank {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser("compress", help="analyze, plan, rewrite and verify in one go")
    compress.add_argument("input", help="the model to compress (never modified)")
    compress.add_argument("output", help="where to write the compressed model (.onnx)")
    goal = compress.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget", type=float, help="fraction of the model's params (or FLOPs, or latency) to keep, "
                                                    "in (0, 1]")
    goal.add_argument("--target-error", type=float, metavar="X",
                      help="instead of a budget: the smallest model whose output error on the samples stays <= X")
    compress.add_argument("--metric", choices=METRICS, default="params",
                          help="what the budget counts: params, flops, or latency (the model's time in onnxruntime, "
                               "measured per layer); default params")
    compress.add_argument("--allocator", choices=ALLOCATOR_CHOICES, default=None,
                          help="auto (default with calibration data): the best of alds/uniform/energy end to end on "
                               "the calibration samples; alds (default without): min-max error over (k, rank); "
                               "uniform/energy: classic k=1 baselines")
    compress.add_argument("--refit", action="store_true",
                          help="refit every decoder and bias on the calibration samples, in topological order")
    compress.add_argument("--plan-out", metavar="P.json", help="also write the chosen plan as JSON")
    _analysis_options(compress)
    _verify_options(compress)
    compress.set_defaults(run=_run_compress)

    analyze = commands.add_parser("analyze", help="per-layer compressibility table; no rewrite")
    analyze.add_argument("input", help="the model to analyze")
    _analysis_options(analyze)
    analyze.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    analyze.set_defaults(run=_run_analyze)

    apply = commands.add_parser("apply", help="rewrite a model with a plan written by --plan-out (or by hand)")
    apply.add_argument("input", help="the model to rewrite (never modified)")
    apply.add_argument("output", help="where to write the rewritten model (.onnx)")
    apply.add_argument("--plan", required=True, metavar="P.json", help="the plan to apply")
    apply.add_argument("--report", metavar="R.json", help="also write the report as JSON")
    apply.add_argument("--refit", action="store_true", help="refit every decoder and bias on the calibration samples")
    _input_options(apply)
    _runtime_options(apply)
    _calibration_options(apply, shrinkage=False)
    _verify_options(apply)
    apply.set_defaults(run=_run_apply)

    sweep = commands.add_parser("sweep", help="compress at several budgets; table of size, speed and output error")
    sweep.add_argument("input", help="the model to sweep (never modified)")
    sweep.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5", help="fractions to keep (default 0.9,...,0.5)")
    sweep.add_argument("--metric", choices=METRICS, default="params", help="what the budget counts (default params)")
    sweep.add_argument("--allocator", default=None, metavar="NAMES",
                       help=f"one or more of {','.join(ALLOCATOR_CHOICES)}, comma-separated "
                            "(default: auto with calibration data, alds without)")
    sweep.add_argument("--plot", metavar="FRONTIER.png", help="draw output error and latency against size")
    sweep.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    _analysis_options(sweep)
    sweep.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sweep.set_defaults(run=_run_sweep)
    return parser


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", metavar="PATH",
                        help=".npz keyed by input name (one batch), or a folder of .npz files (one sample each)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                        help="concrete shape for an input with dynamic dimensions (repeatable; NAME:1,3,224,224 "
                             "works too)")
    parser.add_argument("--input-shapes", dest="input_shape", action="extend", nargs="+", metavar="NAME:1,3,224,224",
                        help="several shapes after one flag, as onnxslim takes them (put it after the model paths)")


def _calibration_options(parser: argparse.ArgumentParser, shrinkage: bool = True) -> None:
    parser.add_argument("--calibration", metavar="PATH",
                        help="samples to calibrate on (same formats as --inputs): layers are decomposed and ranked "
                             "by their output error on these real activations (default: the --inputs samples)")
    parser.add_argument("--weight-only", action="store_true",
                        help="ignore sample data for the decomposition: plain SVD of the weights")
    if shrinkage:
        parser.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE, metavar="A",
                            help="regularisation of the calibration statistics: A x their mean eigenvalue is added "
                                 f"to every direction (default {DEFAULT_SHRINKAGE:g}; raise it with few samples)")


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="onnxruntime intra-op threads to time with, as deployed (default: onnxruntime's, one per "
                             "core)")
    parser.add_argument("--provider", default=DEFAULT_PROVIDER, metavar="NAME",
                        help=f"onnxruntime execution provider to time with (default {DEFAULT_PROVIDER})")


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    _input_options(parser)
    _calibration_options(parser)
    _runtime_options(parser)
    parser.add_argument("--allow-slower", action="store_true",
                        help="skip timing layers: factorize layers even where the factorized form is not measured "
                             "faster than the dense layer")
    parser.add_argument("--exclude", metavar="REGEX", help="leave layers whose name matches this pattern dense")
    parser.add_argument("--max-groups", type=int, default=8, metavar="K",
                        help="largest number of input-channel groups k to consider (default 8; 1 = plain SVD)")
    parser.add_argument("--rank-multiple", type=int, default=1, metavar="N",
                        help="only ranks that are multiples of N (8 or 16 suit onnxruntime's blocked conv kernels)")
    parser.add_argument("--report", metavar="R.json", help="also write the report as JSON")


def _verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-as-external-data", action="store_true",
                        help="write the weights to OUTPUT.data beside the model (automatic above 1.8 GB)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running both models in onnxruntime")
    parser.add_argument("--max-error", type=float, metavar="X",
                        help="exit 1 and write no model when an output's relative L2 error exceeds X")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _run_compress(args: argparse.Namespace, console: Console) -> int:
    _check_inputs(args)
    check_output_path(args.output, (args.input,))
    with _progress(console) as advance:
        model, report = api.compress(
            args.input,
            args.budget,
            target_error=args.target_error,
            metric=args.metric,
            allocator=args.allocator,
            calibration=args.calibration,
            weight_only=args.weight_only,
            refit=args.refit,
            shrinkage=args.shrinkage,
            rank_multiple=args.rank_multiple,
            max_groups=args.max_groups,
            exclude=args.exclude,
            inputs=args.inputs,
            input_shapes=args.input_shape,
            verify=args.verify,
            allow_slower=args.allow_slower,
            threads=args.threads,
            provider=args.provider,
            progress=advance,
        )
    return _finish(args, console, model, report)


def _run_apply(args: argparse.Namespace, console: Console) -> int:
    _check_inputs(args)
    check_output_path(args.output, (args.input,))
    plan = Plan.load(args.plan)
    model, report = api.apply(args.input, plan, inputs=args.inputs, input_shapes=args.input_shape, verify=args.verify,
                              calibration=args.calibration, weight_only=args.weight_only, refit=args.refit,
                              threads=args.threads, provider=args.provider)
    return _finish(args, console, model, report)


def _run_analyze(args: argparse.Namespace, console: Console) -> int:
    _check_inputs(args)
    with _progress(console) as advance:
        analysis = api.analyze(
            args.input,
            input_shapes=args.input_shape,
            inputs=args.inputs,
            calibration=args.calibration,
            weight_only=args.weight_only,
            shrinkage=args.shrinkage,
            exclude=args.exclude,
            max_groups=args.max_groups,
            rank_multiple=args.rank_multiple,
            allow_slower=args.allow_slower,
            threads=args.threads,
            provider=args.provider,
            progress=advance,
        )
    render_analysis(analysis, console)
    if args.report:
        _write_text(args.report, json.dumps(_analysis_dict(analysis), indent=2) + "\n")
    return EXIT_OK


def _run_sweep(args: argparse.Namespace, console: Console) -> int:
    _check_inputs(args)
    budgets = parse_budgets(args.budgets)
    allocators = None
    if args.allocator is not None:
        allocators = [name.strip() for name in args.allocator.split(",") if name.strip()]
        unknown = [name for name in allocators if name not in ALLOCATOR_CHOICES]
        if unknown or not allocators:
            raise InvalidOptionError(
                f"--allocator takes names from {', '.join(ALLOCATOR_CHOICES)}. Got {args.allocator!r}."
            )
    with Console(stderr=True, quiet=args.quiet).status("sweeping") as status:
        result = sweep(
            args.input,
            budgets,
            allocators=allocators,
            metric=args.metric,
            inputs=args.inputs,
            calibration=args.calibration,
            weight_only=args.weight_only,
            shrinkage=args.shrinkage,
            input_shapes=args.input_shape,
            rank_multiple=args.rank_multiple,
            max_groups=args.max_groups,
            exclude=args.exclude,
            latency=args.latency,
            allow_slower=args.allow_slower,
            threads=args.threads,
            provider=args.provider,
            progress=lambda cell: status.update(f"sweeping: {cell}"),
        )
    render_sweep(result, console)
    if args.report:
        _write_text(args.report, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot:
        plot_frontier(result.points, args.plot, title=f"{Path(args.input).name} ({args.metric} budget)")
        console.print(f"wrote {args.plot}")
    return EXIT_OK


def _finish(args: argparse.Namespace, console: Console, model, report: Report) -> int:
    render(report, console)
    if args.report:
        _write_text(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
    verification = report.verification
    if args.max_error is not None and verification is not None and not verification.passed(args.max_error):
        print(
            f"onnx-lowrank: output error {verification.worst_relative_l2:.4g} exceeds --max-error {args.max_error:g}; "
            f"{args.output} was not written. Raise the budget or the tolerance.",
            file=sys.stderr,
        )
        return EXIT_VERIFICATION
    save_model(model, args.output, external_data=True if args.save_as_external_data else None)
    if getattr(args, "plan_out", None):
        _write_text(args.plan_out, report.plan.to_json())
    console.print(f"wrote {args.output}")
    return EXIT_OK


def _check_inputs(args: argparse.Namespace) -> None:
    """Option checks that need no model, so mistakes cost nothing."""
    if getattr(args, "budget", None) is not None and not 0 < args.budget <= 1:
        raise InvalidOptionError(f"--budget must be a fraction in (0, 1]. Got {args.budget:g} instead.")
    if getattr(args, "max_error", None) is not None and not args.max_error >= 0:
        raise InvalidOptionError(f"--max-error must be >= 0. Got {args.max_error:g} instead.")
    if getattr(args, "max_error", None) is not None and getattr(args, "verify", True) is False:
        raise InvalidOptionError("--max-error needs verification, which --no-verify turns off; drop one of them.")
    if getattr(args, "target_error", None) is not None and not args.target_error >= 0:
        raise InvalidOptionError(f"--target-error must be >= 0. Got {args.target_error:g} instead.")
    if getattr(args, "calibration", None) and getattr(args, "weight_only", False):
        raise InvalidOptionError("--calibration and --weight-only contradict each other; give one or the other.")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise InvalidOptionError(f"--threads must be a whole number >= 1. Got {args.threads} instead.")
    if getattr(args, "shrinkage", None) is not None and not 0 <= args.shrinkage < float("inf"):
        raise InvalidOptionError(f"--shrinkage must be a finite number >= 0. Got {args.shrinkage:g} instead.")
    for option in ("report", "plan_out", "plot"):
        value = getattr(args, option, None)
        flag = "--" + option.replace("_", "-")
        if value and Path(value).is_dir():
            raise InvalidOptionError(f"{flag} {value!r} is a folder; give a file name.")
        if value and not Path(value).parent.is_dir():
            raise InvalidOptionError(f"folder of {flag} {value!r} does not exist; create it first.")


def _write_text(path: str, text: str) -> None:
    """Atomic write: a temporary file beside the target, renamed into place."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".onnx-lowrank-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class _progress:
    """Progress bars on stderr, one per stage (calibrating, analyzing, searching); nothing when quiet or not a
    terminal."""

    def __init__(self, console: Console):
        stderr = Console(stderr=True, quiet=console.quiet)
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=stderr, transient=True, disable=not stderr.is_terminal,
        )
        self._tasks: dict[str, object] = {}

    def __enter__(self):
        self._bar.start()

        def advance(stage: str, done: int, total: int | None) -> None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(stage, total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)

        return advance

    def __exit__(self, *exc) -> None:
        self._bar.stop()


def _analysis_dict(analysis) -> dict:
    return {
        "totals": {name: model.total for name, model in analysis.costs.items()},
        "never_slower_guard": analysis.guarded,
        "layer_error_measure": analysis.measure,
        "calibrated_on": analysis.calibration,
        "notes": list(analysis.notes),
        "layers": [
            {
                "name": a.layer.name,
                "op": a.layer.op,
                "weight_shape": list(a.layer.weight_shape),
                "dense": dict(a.dense),
                "candidates": [{"k": c.k, "rank": c.rank, "error": c.error, **c.costs} for c in a.candidates],
            }
            for a in analysis.layers
        ],
        "skipped": [s.__dict__ for s in analysis.skipped],
    }


if __name__ == "__main__":
    sys.exit(main())
