"""The report on the terminal: rich tables of what a compression, an analysis or a sweep found.

Rendering only: what is shown comes from the data in `stages.report.Report` (and `Analysis`, `sweep.Sweep`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from onnx_lowrank.stages.analyze import Analysis
from onnx_lowrank.ops.layer import Skipped
from onnx_lowrank.stages.report import LARGE_ERROR, Report, skip_summary

__all__ = ["render", "render_analysis", "render_sweep", "shorten"]

_MIN_NAME_WIDTH = 16
_WIDE_CONSOLE = 120  # columns below which the layer table drops weight shapes and costs the budget did not count


def render(report: Report, console: Console) -> None:
    """Per-layer table, totals, verification and timings. Long names are shortened to fit the console; below
    `_WIDE_CONSOLE` columns the layer table shows only the budget's cost (and params) and no weight shapes. The JSON
    report keeps everything."""
    fit = _shortener(console, [row.name for row in report.layers] + [s.name for s in report.skipped])
    narrow = console.width < _WIDE_CONSOLE
    metrics = [name for name in report.before if not narrow or name in ("params", report.plan.metric)]
    table = Table(title="Layers", title_justify="left", show_lines=False, box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD)
    columns = [("layer", "left"), ("op", "left")] + ([] if narrow else [("weight", "left")])
    columns += [("k", "right"), ("rank", "right")]
    columns += [(_label(name, report.units), "right") for name in metrics] + [("error", "right")]
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column == "layer")
    for row in report.layers:
        dense = row.rank is None
        table.add_row(
            fit(row.name),
            row.op,
            *([] if narrow else ["x".join(map(str, row.weight_shape))]),
            "-" if dense else str(row.k),
            "dense" if dense else str(row.rank),
            *(_before_after(*row.costs[name], dense, report.units.get(name, "")) for name in metrics),
            "-" if row.error is None else f"{row.error:.4f}",
            style="dim" if dense else None,
        )
    if narrow and report.layers:
        table.caption = "weight shapes and the other costs: in a wider terminal, or in the JSON report (--report)"
        table.caption_justify = "left"
    if report.layers:  # an empty table says nothing; the skipped table and the message say why
        console.print(table)
    if report.skipped:
        skipped = Table(title="Skipped (every layer is listed in the JSON report)", title_justify="left")
        for column, justify in (("layers", "right"), ("op", "left"), ("reason", "left"), ("for example", "left")):
            skipped.add_column(column, justify=justify, overflow="fold", no_wrap=column == "for example")
        for count, op, reason, example in skip_summary(report.skipped):
            skipped.add_row(str(count), op, reason, fit(example))
        console.print(skipped)
    if report.thin_calibration:
        thin = Table(title="Calibrated on fewer rows than input dimensions", title_justify="left")
        for column, justify in (("layer", "left"), ("rows", "right"), ("dims", "right"), ("decomposed", "left")):
            thin.add_column(column, justify=justify, overflow="fold")
        for entry in report.thin_calibration:
            thin.add_row(fit(entry.name), str(entry.rows), str(entry.dims),
                         "weight-only (too few rows)" if entry.weight_only else "on the data, shrunk")
        console.print(thin)
    if report.narrowed:
        narrowed = Table(title="Narrowed (output channels kept; their readers absorb the rest)", title_justify="left")
        for column, justify in (("layer", "left"), ("op", "left"), ("channels", "right"), ("readers", "right"),
                                ("error", "right")):
            narrowed.add_column(column, justify=justify, overflow="fold", no_wrap=column == "layer")
        for row in report.narrowed:
            narrowed.add_row(fit(row.name), row.op, f"{row.channels} -> {row.width}", str(len(row.readers)),
                             f"{row.error:.4f}")
        console.print(narrowed)

    totals = Table(title="Model", title_justify="left")
    for column in ("", "before", "after", "ratio"):
        totals.add_column(column, justify="right" if column else "left")
    for name in report.before:  # every cost, however narrow the console: this table is small
        unit = report.units.get(name, "")
        label = _label(name, report.units) + (" (predicted)" if unit == "ms" else "")
        ratio = report.ratio(name)
        totals.add_row(label, _value(report.before[name], unit), _value(report.after.get(name), unit),
                       "-" if ratio is None else f"{ratio:.3f}")
    if report.latency is not None:
        timed = report.latency
        label = ("latency ms (measured, int8: before = int8 alone)" if timed.against != "original" else
                 "latency ms (measured, float)" if report.deployment is not None else "latency ms (measured)")
        totals.add_row(label, f"{timed.original_ms:.3f}", f"{timed.compressed_ms:.3f}",
                       f"{timed.ratio:.3f}")
    skipped_note = f" ({len(report.skipped)} more skipped)" if report.skipped else ""
    totals.add_row("factorized layers", "", f"{len(report.factorized)} of {len(report.layers)}{skipped_note}", "")
    worst = max((r.error for r in report.factorized), default=None)
    if worst is not None:
        totals.add_row("worst layer error", "", f"{worst:.4f}", "")
    console.print(totals)
    if report.latency is not None:
        error, predicted = report.predicted_latency_error, report.ratio("latency")
        baseline = report.latency.baseline
        forecast = "" if error is None else f"; predicted {predicted:.3f}x of {baseline}, off by {error:+.1%}"
        bounds = report.latency.bounds
        spread = "" if bounds is None else (f", {bounds[0]:.3f}-{bounds[1]:.3f} over "
                                            f"{len(report.latency.pair_ratios)} measurements with fresh sessions")
        console.print(f"Speedup {1 / report.latency.ratio:.2f}x in onnxruntime: {report.latency.ratio:.3f}x of "
                      f"{baseline}'s time (medians of both models timed interleaved{spread}{forecast}).")
    if report.guarded:
        console.print("Never slower: candidates measured slower than their dense layer beyond noise were left out "
                      "(--allow-slower lifts this).")
    check = report.speed_check
    if check is not None:
        dropped = f"; {len(check.dropped)} planned layer(s) kept dense to get there" if check.dropped else ""
        if check.kept:
            baseline = "the original" if report.latency is None else report.latency.baseline
            console.print(f"Never slower, checked: the written model was measured faster than {baseline} beyond "
                          f"noise{dropped}.")
        else:
            console.print(f"[yellow]Never slower, not shown: {check.note}[/yellow]")
    for note in report.notes:
        console.print(note)
    if report.speed_note:
        console.print(f"[yellow]{report.speed_note}[/yellow]")
    if report.calibrated_on is not None and report.layers:
        refit = "; decoders refit on them" if report.refit else ""
        console.print(f"Calibrated on {report.calibrated_on}: layer errors are relative output errors on those samples{refit}.")
    elif report.layers:
        console.print("Weight-only (no calibration data): layer errors are relative spectral errors of the weights.")
    for note in report.plan.notes:
        console.print(note)
    if report.search:
        search = Table(title=f"Search for the smallest model with {report.search_goal}", title_justify="left")
        for column in ("step", "budget", "kept", "value", "met"):
            search.add_column(column, justify="right")
        for index, step in enumerate(report.search, 1):
            search.add_row(str(index), f"{step.budget:.4g}", "-" if step.achieved is None else f"{step.achieved:.3f}",
                           _float(step.value, digits=4), "yes" if step.passed else "no")
        console.print(search)

    if report.verification is not None:
        source = "random" if report.verified_on == "random" else report.verified_on
        title = f"Verification in onnxruntime ({report.verification.describe()} from {source})"
        check = Table(title=title, title_justify="left")
        for column in ("output", "relative L2", "max abs", "cosine", "top-1 agreement"):
            check.add_column(column, justify="left" if column == "output" else "right", no_wrap=column == "output")
        fit_output = _shortener(console, [out.name for out in report.verification.outputs])
        for out in report.verification.outputs:
            check.add_row(
                fit_output(out.name),
                _float(out.relative_l2),
                _float(out.max_abs),
                _float(out.cosine, digits=6),
                "-" if out.top1_agreement is None else f"{out.top1_agreement:.4f}",
            )
        console.print(check)
        if report.verified_on == "random":
            console.print(
                "[yellow]Verified on random inputs, which few real models respond to like real data: "
                "pass --inputs with real samples for errors that predict accuracy.[/yellow]"
            )
        if report.in_sample:
            console.print(
                "[yellow]Verification is in-sample: it ran on the calibration samples themselves, so it is "
                "optimistic. Pass held-out samples with --inputs and calibration samples with --calibration.[/yellow]"
            )
    if report.deployment is not None:
        _render_deployment(report.deployment, console)
    if report.message:
        console.print(report.message)
    large = report.verification is not None and not report.verification.worst_relative_l2 < LARGE_ERROR
    for line in report.verdict:
        warn = (large and line.startswith("Outputs")) or line.startswith("Far below the budget")
        style = "bold yellow" if warn else "bold"
        console.print(f"[{style}]{line}[/{style}]")
    if report.seconds:
        console.print("time: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in report.seconds.items()))


def render_analysis(analysis: Analysis, console: Console, error_levels: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)) -> None:
    """Per-layer compressibility: the smallest fraction of its params a layer can keep at each error level."""
    measure = "relative output error on the calibration data" if analysis.measure == "output" else (
        "relative spectral error of the weight, no data")
    table = Table(title=f"Compressibility (fraction of params kept at a given {measure})", title_justify="left")
    units = {name: model.unit for name, model in analysis.costs.items()}
    fit = _shortener(console, [entry.layer.name for entry in analysis.layers])
    for column in ("layer", "op", "weight"):
        table.add_column(column, overflow="fold", no_wrap=column == "layer")
    for name in analysis.costs:
        table.add_column(_label(name, units), justify="right")
    for level in error_levels:
        table.add_column(f"err<={level:g}", justify="right")
    for entry in analysis.layers:
        cells = []
        for level in error_levels:
            fitting = [c.costs["params"] for c in entry.candidates if c.error <= level]
            cells.append(f"{min(fitting) / entry.dense['params']:.2f}" if fitting else "1.00")
        table.add_row(
            fit(entry.layer.name),
            entry.layer.op,
            "x".join(map(str, entry.layer.weight_shape)),
            *(_value(entry.dense[name], units[name]) for name in analysis.costs),
            *cells,
        )
    console.print(table)
    totals = ", ".join(f"{_label(name, units)} {_value(model.total, model.unit)}" for name, model in analysis.costs.items())
    console.print(f"{len(analysis.layers)} factorizable layers, {len(analysis.skipped)} skipped; model {totals}")
    for note in analysis.notes:
        console.print(note)
    for count, op, reason, _ in skip_summary(analysis.skipped):
        console.print(f"  {count} {op} skipped: {reason}")
    if analysis.method != "lowrank":
        _render_narrowable(analysis, console, error_levels)


def _render_narrowable(analysis: Analysis, console: Console, error_levels: tuple[float, ...]) -> None:
    """Per narrowable layer: the fewest output channels it can keep at each error level of its readers."""
    table = Table(title="Narrowable (output channels kept at a given relative output error of the readers)",
                  title_justify="left")
    fit = _shortener(console, [entry.chain.name for entry in analysis.chains])
    for column in ("layer", "op", "channels", "producers", "readers"):
        table.add_column(column, overflow="fold", no_wrap=column == "layer", justify="left" if column in
                         ("layer", "op") else "right")
    for level in error_levels:
        table.add_column(f"err<={level:g}", justify="right")
    for entry in analysis.chains:
        cells = [str(min((c.width for c in entry.candidates if c.error <= level), default=entry.chain.channels))
                 for level in error_levels]
        table.add_row(fit(entry.chain.name), entry.chain.producers[0].op, str(entry.chain.channels),
                      str(len(entry.chain.producers)), str(len(entry.chain.readers)), *cells)
    if analysis.chains:
        console.print(table)
    coupled = sum(1 for entry in analysis.chains if len(entry.chain.producers) > 1)
    layers = sum(len(entry.chain.producers) for entry in analysis.chains)
    console.print(f"{layers} narrowable layers in {len(analysis.chains)} sets of channels ({coupled} coupled: "
                  f"several producers, cut together); {len(analysis.unnarrowed)} not narrowable")
    general = [Skipped(s.name, s.op, re.sub(r" '[^']*'", "", s.reason)) for s in analysis.unnarrowed]  # by op
    for count, op, reason, example in skip_summary(general):
        console.print(f"  {count} {op}: {reason} (e.g. {fit(example)})")


def render_sweep(result, console: Console) -> None:
    """One row per (allocator, budget) cell of a sweep."""
    deployed = getattr(result, "deployed", None)
    title = f"Sweep (output error on {result.samples} samples)"
    if deployed is not None:
        title += f"; every cell ours + int8 ({deployed['description']})"
    table = Table(title=title, title_justify="left")
    for column in ("alloc", "budget", "params", "FLOPs", "size", "time", "out err", "top-1", "layer err", "n", "s"):
        table.add_column(column, justify="left" if column == "alloc" else "right", no_wrap=True)
    for p in result.points:
        table.add_row(
            p.allocator,
            f"{p.budget:g}",
            f"{p.params_ratio:.3f}",
            "-" if p.flops_ratio is None else f"{p.flops_ratio:.3f}",
            "-" if p.size_ratio is None else f"{p.size_ratio:.3f}",
            "-" if p.latency_ratio is None else f"{p.latency_ratio:.3f}",
            _float(p.output_error, digits=3),
            "-" if p.top1_agreement is None else f"{p.top1_agreement:.3f}",
            f"{p.max_layer_error:.3f}",
            str(p.layers_factorized),
            f"{p.tool_seconds:.1f}",
        )
    console.print(table)
    if result.message:
        console.print(result.message)
    for allocator, budget, why in result.unreachable:
        console.print(f"[yellow]{allocator} at {budget:g}: {why}[/yellow]")
    reference = "the original" if deployed is None else "the original (size and time: of int8 alone)"
    console.print(
        f"params, FLOPs, size, time: fractions of {reference} (time: onnxruntime median, measured interleaved); "
        "out err: worst output relative L2; layer err: worst layer's "
        + ("relative output error on the calibration data" if getattr(result, "measure", "") == "output"
           else "relative spectral error")
        + "; n: layers factorized; "
        "s: tool seconds (analyze + plan + apply)."
    )


def shorten(name: str, width: int) -> str:
    """`name` cut to its last `width` characters: exported names are paths, and their tail is the most specific part
    ("…2/cv3.2/cv3.2.2/Conv")."""
    if len(name) <= width:
        return name
    return "…" + name[len(name) - width + 1:]


def _shortener(console: Console, names: Sequence[str]):
    """Shortening for a table of `names`: a quarter of the console wide, wider where two names would look alike.
    The JSON report keeps every name whole."""
    width = max(_MIN_NAME_WIDTH, console.width // 4)
    distinct = set(names)
    longest = max(map(len, distinct), default=0)
    while width < longest and len({shorten(name, width) for name in distinct}) < len(distinct):
        width += 2
    return lambda name: shorten(name, width)


def _label(name: str, units: Mapping[str, str]) -> str:
    unit = units.get(name, "")
    return f"{name} {unit}" if unit else name


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if unit == "ms" else _count(value)


def _before_after(before: float | None, after: float | None, dense: bool, unit: str = "") -> str:
    if before is None:
        return "-"
    return _value(before, unit) if dense else f"{_value(before, unit)}→{_value(after, unit)}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _float(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}g}" if digits != 6 else f"{value:.6f}"


def _render_deployment(deployment, console: Console) -> None:
    """The deployed form next to its alternatives: size, measured time and output error of each model."""
    alone = deployment.model("int8 alone")
    table = Table(title=f"Deployed as int8 ({deployment.quantization.describe()})", title_justify="left")
    for column in ("model", "file MB", "size vs int8 alone", "latency (of the original)", "output error"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in deployment.models:
        table.add_row(row.label, f"{row.size_bytes / 1e6:.2f}",
                      f"{row.size_bytes / alone.size_bytes:.2f}x" if alone.size_bytes else "-",
                      "-" if row.latency_ratio is None else f"{row.latency_ratio:.3f}x",
                      "-" if row.error is None else _float(row.error))
    console.print(table)
    if deployment.against_int8 is not None:
        ratio, lower, upper = deployment.against_int8
        console.print(f"Ours + int8 against int8 alone: {ratio:.3f}x its time ({lower:.3f}-{upper:.3f}, medians of the "
                      "four models timed interleaved, each measurement with fresh sessions).")
    if deployment.activation_ms:
        times = ", ".join(f"{kind} {ms:.3f} ms" for kind, ms in deployment.activation_ms.items())
        console.print(f"Activation type measured on the original quantized both ways: {times}; the faster quantizes "
                      "both int8 models.")
    for note in deployment.notes:
        console.print(note)
