"""`onnx-lowrank` on the command line: a thin layer over the Python API.

Exit codes: 0 success (also when there is nothing to compress), 1 verification error above --max-error (the model
is then not written), 2 bad input or usage, with one line on stderr and no output file written, 3 a bug of ours
(one line asking for a report; nothing written).
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

from onnx_lowrank import __version__

from onnx_lowrank import api
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.graph.load import check_output_path, save_model
from onnx_lowrank.plan import Plan
from onnx_lowrank.cli.plot import plot_frontier
from onnx_lowrank.options import add_flags, check, keywords_for
from onnx_lowrank.cli.render import render, render_analysis, render_sweep
from onnx_lowrank.stages.report import Report
from onnx_lowrank.sweep import sweep

EXIT_OK, EXIT_VERIFICATION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"onnx-lowrank: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    console = _console(args.quiet)
    try:
        return args.run(args, console)
    except LowRankError as exc:
        print(f"onnx-lowrank: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, not a traceback (outputs are only ever renamed into place)
        print(f"onnx-lowrank: internal error: {type(exc).__name__}: {_one_line(exc)}; please report it",
              file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _UsageError(Exception):
    """An argparse usage error, raised instead of argparse's usage block and exit."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`onnx-lowrank: error: ...`, exit 2) instead of a usage block."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _console(quiet: bool) -> Console:
    """Tables on stdout; when stdout is not a terminal, wide enough that columns are not cut."""
    console = Console(quiet=quiet)
    return console if console.is_terminal else Console(quiet=quiet, width=160)


_ANALYSIS = ("inputs", "input_shapes", "calibration", "weight_only", "shrinkage", "threads", "provider", "allow_slower",
             "exclude", "max_groups", "rank_multiple", "report")
_WRITING = ("save_as_external_data", "verify", "max_error", "quiet")


def _parser() -> argparse.ArgumentParser:
    """Subcommands with their flags, all from the declarations in `options`."""
    parser = _ArgumentParser(
        prog="onnx-lowrank",
        description="Compress the Conv/Gemm/MatMul layers of an ONNX model by grouped low-rank factorization.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-lowrank {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_ArgumentParser)

    compress = commands.add_parser("compress", help="analyze, plan, rewrite and verify in one go")
    compress.add_argument("input", help="the model to compress (never modified)")
    compress.add_argument("output", help="where to write the compressed model (.onnx)")
    add_flags(compress.add_mutually_exclusive_group(required=True), ("budget", "target_error"))
    add_flags(compress, ("metric", "allocator", "method", "refit", "plan_out", "quantize", "upgrade_opset", *_ANALYSIS,
                         *_WRITING))
    compress.set_defaults(run=_run_compress)

    analyze = commands.add_parser("analyze", help="per-layer compressibility table; no rewrite")
    analyze.add_argument("input", help="the model to analyze")
    add_flags(analyze, ("method", *_ANALYSIS, "quiet"))
    analyze.set_defaults(run=_run_analyze)

    apply = commands.add_parser("apply", help="rewrite a model with a plan written by --plan-out (or by hand)")
    apply.add_argument("input", help="the model to rewrite (never modified)")
    apply.add_argument("output", help="where to write the rewritten model (.onnx)")
    add_flags(apply, ("plan",), required=True)
    add_flags(apply, ("report", "refit", "inputs", "input_shapes", "threads", "provider", "calibration", "weight_only",
                      "quantize", "upgrade_opset", *_WRITING))
    apply.set_defaults(run=_run_apply)

    sweep = commands.add_parser("sweep", help="compress at several budgets; table of size, speed and output error")
    sweep.add_argument("input", help="the model to sweep (never modified)")
    add_flags(sweep, ("budgets", "metric", "allocators", "method", "plot", "latency", "quantize", "upgrade_opset",
                      *_ANALYSIS, "quiet"))
    sweep.set_defaults(run=_run_sweep)
    return parser


def _run_compress(args: argparse.Namespace, console: Console) -> int:
    check(vars(args))
    check_output_path(args.output, (args.input,))
    with _progress(console) as advance:
        model, report = api.compress(args.input, **keywords_for(api.compress, vars(args)), progress=advance)
    return _finish(args, console, model, report)


def _run_apply(args: argparse.Namespace, console: Console) -> int:
    check(vars(args))
    check_output_path(args.output, (args.input,))
    keywords = {**keywords_for(api.apply, vars(args)), "plan": Plan.load(args.plan)}
    model, report = api.apply(args.input, **keywords)
    return _finish(args, console, model, report)


def _run_analyze(args: argparse.Namespace, console: Console) -> int:
    check(vars(args))
    with _progress(console) as advance:
        analysis = api.analyze(args.input, **keywords_for(api.analyze, vars(args)), progress=advance)
    render_analysis(analysis, console)
    if args.report:
        _write_text(args.report, json.dumps(_analysis_dict(analysis), indent=2) + "\n")
    return EXIT_OK


def _run_sweep(args: argparse.Namespace, console: Console) -> int:
    check(vars(args))
    with Console(stderr=True, quiet=args.quiet).status("sweeping") as status:
        result = sweep(args.input, **keywords_for(sweep, vars(args)),
                       progress=lambda cell: status.update(f"sweeping: {cell}"))
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
        "method": analysis.method,
        "narrowable": [
            {"name": c.chain.name, "op": c.chain.producers[0].op, "channels": c.chain.channels,
             "producers": [p.name for p in c.chain.producers], "readers": [r.name for r in c.chain.readers],
             "candidates": [{"width": w.width, "error": w.error, **w.savings} for w in c.candidates]}
            for c in analysis.chains
        ],
        "not_narrowable": [s.__dict__ for s in analysis.unnarrowed],
    }


if __name__ == "__main__":
    sys.exit(main())
