"""int8 deployment: a model quantized by onnxruntime's own quantization, the same way for the original and for ours.

Edge deployments quantize, so what low rank is worth is judged against int8 alone and on top of it. Nothing here is
a quantizer of ours: `onnxruntime.quantization` does the work, after the preprocessing it recommends
(`quant_pre_process`: ONNX shape inference and onnxruntime's basic graph optimizations, BatchNorm folded into Conv;
its symbolic shape inference is skipped when it cannot finish, e.g. on YOLOv8n, or when sympy is not installed).

- `int8`: static QDQ, weights int8 per output channel where the opset allows it (QDQ's `axis` needs opset 13; an
  older model is quantized per tensor unless `--upgrade-opset` converts it first with onnx's version converter), the
  activations' ranges calibrated on the same samples the compression was calibrated on, through a
  `CalibrationDataReader`, by the method of `RANGES` whose int8 alone moved the outputs least on them
  (`deployment.choose_ranges`); the nodes after the last weighted layer stay in float (`weightless_tail`). Without
  calibration data, dynamic quantization instead (a note says so).
- `int8-dynamic`: dynamic quantization (weights int8, activations quantized at run time): onnxruntime's choice for
  transformers (per tensor, its default).

The activations' type of static QDQ is measured, not assumed: onnxruntime's default (int8 activations) ran YOLOv8n
2.5x *slower* than float32 on an AVX-512 VNNI Xeon, and uint8 activations 0.63x of it, at the same output error
(which kernel is fast is the CPU's business). So the original is quantized both ways and the two are timed
interleaved; the faster one's type quantizes ours too, so the two int8 models differ only by the low-rank rewrite.
The times are kept in the latency cache under each model's bytes, so runs sharing a cache choose, and write, the same.

The recipe is settled before planning (`pipeline.deploy_int8`), and `QuantizedTimer` then times every model the
planning measures in this int8 form: this module comes before `timing` in the stage order for that reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.graph.editor import default_opset
from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.graph.runtime import model_size

__all__ = ["QUANTIZE_MODES", "PER_CHANNEL_OPSET", "RANGES", "Quantization", "QuantizedTimer", "as_deployed",
           "quantization_ops", "plan_quantization", "quantize", "quantize_each", "upgrade_opset", "weightless_tail", "with_shapes"]

QUANTIZE_MODES = ("int8", "int8-dynamic")
PER_CHANNEL_OPSET = 13
"""The default-domain opset from which QDQ's QuantizeLinear/DequantizeLinear take a per-channel `axis`."""
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "QAttention", "QLinearSoftmax", "QLinearWhere",
})
RANGES = ("minmax", "percentile-99.99", "percentile-99.999")
"""How static QDQ sets every activation's range from the calibration samples: onnxruntime's MinMax, or its Percentile
method (the rarest values clipped, finer steps for all the others). Which one is best depends on the model and on the
samples, so it is measured (`deployment.choose_ranges`): MinMax's ranges stretch with every outlier the samples
hold (PP-OCRv4 rec's int8 alone fell from char accuracy 0.956 to 0.844 when calibrated on 64 lines instead of 16;
at the 99.99th percentile 0.970 and 0.976), and on YOLOv8n box F1 went 0.849 (MinMax) -> 0.940 (99.99th)."""
_EXTERNAL_ABOVE = 1 << 30
"""Models larger than this go through the temporary folder with their weights in a side file (protobuf's 2 GiB)."""


@dataclass(frozen=True)
class Quantization:
    """How a model is quantized: the one recipe applied to the original (int8 alone) and to ours."""

    mode: str  # "static" (QDQ, calibrated) or "dynamic"
    per_channel: bool
    activations: str  # "uint8" or "int8" (static: measured, `choose_activations`); dynamic: "uint8 at run time"
    opset: int  # the default-domain opset the models are quantized at
    upgraded_from: int | None = None  # the model's own opset, when --upgrade-opset converted it
    symbolic_shapes: bool = True  # onnxruntime's symbolic shape inference finishes on the original (`with_shapes`)
    ranges: str = RANGES[0]  # static: how the activations' ranges are calibrated (`RANGES`, `choose_ranges`)

    def describe(self) -> str:
        """'static QDQ, per-channel int8 weights, uint8 activations'."""
        weights = "per-channel" if self.per_channel else "per-tensor"
        if self.mode == "dynamic":
            return f"dynamic, {weights} int8 weights, activations quantized at run time"
        how = "min-max ranges" if self.ranges == "minmax" else f"ranges at the {self.ranges.split('-')[1]}th percentile"
        return (f"static QDQ, {weights} int8 weights, {self.activations} activations ({how}), the weightless tail "
                "in float")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "per_channel": self.per_channel, "activations": self.activations,
                "opset": self.opset, "upgraded_from": self.upgraded_from, "ranges": self.ranges,
                "description": self.describe()}

    @property
    def planning(self) -> "Quantization":
        """This recipe with min-max ranges, the cheapest to calibrate: what the planning quantizes the many models it
        times and judges with (the ranges change the scales, not which kernels run)."""
        return replace(self, ranges=RANGES[0])

    @property
    def key(self) -> str:
        """The recipe as stable text: part of the latency cache's keys for times measured in this int8 form (the
        ranges left out: they change the scales, not which kernels run)."""
        return json.dumps({k: v for k, v in self.to_dict().items() if k not in ("description", "ranges")},
                          sort_keys=True)


def quantization_ops(model: onnx.ModelProto) -> list[str]:
    """The quantization operators a model already holds (QDQ or QOperator), by op type, in graph order."""
    return list(dict.fromkeys(node.op_type for node in model.graph.node if node.op_type in _QUANTIZED_OPS))


def plan_quantization(model: onnx.ModelProto, mode: str, calibrated: bool, upgrade: bool
                      ) -> tuple[Quantization, tuple[str, ...]]:
    """The recipe for `mode` on `model` (activations "uint8" until measured), and the notes a user should read: a
    static request without calibration data made dynamic, an opset too old for per-channel weights."""
    if mode not in QUANTIZE_MODES:
        raise InvalidOptionError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}. Got {mode!r} instead.")
    held = quantization_ops(model)
    if held:
        raise InvalidOptionError(f"The model is already quantized (it holds {', '.join(held[:3])}): --quantize "
                                 "needs the float model; give that one.")
    notes = []
    dynamic = mode == "int8-dynamic"
    if not dynamic and not calibrated:
        dynamic = True
        notes.append("No calibration data (--calibration or --inputs) to calibrate static int8 on: quantized "
                     "dynamically instead (activations quantized at run time).")
    try:
        opset = own = default_opset(model)
    except ValueError as exc:  # no default-domain opset: no Conv, Gemm or MatMul either
        raise InvalidOptionError(f"--quantize: {exc}; there is nothing for int8 to quantize.") from exc
    upgraded_from = None
    if own < PER_CHANNEL_OPSET and not dynamic:
        if upgrade:
            opset, upgraded_from = PER_CHANNEL_OPSET, own
            notes.append(f"The model's opset {own} was converted to {PER_CHANNEL_OPSET} (onnx's version converter, "
                         "--upgrade-opset) for per-channel int8 weights.")
        else:
            notes.append(f"Quantized per tensor: the model's opset {own} is below {PER_CHANNEL_OPSET}, which "
                         "per-channel int8 weights need (usually more accurate); --upgrade-opset converts it first.")
    # dynamic: per tensor, onnxruntime's default (per-channel DynamicQuantizeMatMul refused the zero points of a
    # factorized MatMul: "b zero point is not valid")
    quantization = Quantization("dynamic" if dynamic else "static", not dynamic and opset >= PER_CHANNEL_OPSET,
                                "uint8 at run time" if dynamic else "uint8", opset, upgraded_from)
    return quantization, tuple(notes)


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` converted to the default-domain `opset` by onnx's version converter (one line when it cannot)."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises plain RuntimeErrors for ops it has no adapter for
        raise InvalidOptionError(f"onnx's version converter could not take this model to opset {opset} "
                                 f"({' '.join(str(exc).split())[:200]}); quantize without --upgrade-opset "
                                 "(per tensor).") from exc


def quantize(model: onnx.ModelProto, quantization: Quantization,
             calibration: Samples | Sequence[Mapping[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """`model` quantized by onnxruntime as `quantization` says (static needs `calibration`, feed dicts; dynamic
    ignores it)."""
    return quantize_each(model, quantization, calibration, (quantization.activations,))[quantization.activations]


def as_deployed(model: onnx.ModelProto, quantization: Quantization | None,
                calibration: Samples | Sequence[Mapping[str, np.ndarray]] | None) -> onnx.ModelProto:
    """`model` in the form it is deployed in: quantized by `quantization`, or as it is (None: float)."""
    return model if quantization is None else quantize(model, quantization, calibration)


def quantize_each(model: onnx.ModelProto, quantization: Quantization,
                  calibration: Samples | Sequence[Mapping[str, np.ndarray]] | None, activations: Sequence[str]
                  ) -> dict[str, onnx.ModelProto]:
    """`model` quantized once per activation type of `activations` (static; dynamic takes one), preprocessed and
    calibrated once: the activations' ranges do not depend on their type (onnxruntime's calibration cache). Through
    a temporary folder (onnxruntime's quantizer works on files); each result is read back whole."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if quantization.upgraded_from is not None and default_opset(model) < quantization.opset:
        model = upgrade_opset(model, quantization.opset)
    large = model_size(model) > _EXTERNAL_ABOVE
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-") as folder, _working_in(folder), _quietly():
        source, prepared, ranges = (Path(folder) / name for name in ("model.onnx", "prepared.onnx", "ranges.json"))
        onnx.save_model(model, source, save_as_external_data=large, location="model.data" if large else None)
        _preprocess(source, prepared, large, quantization.symbolic_shapes)
        kept_float = weightless_tail(onnx.load_model(prepared, load_external_data=False))
        for kind in activations:
            output = Path(folder) / f"{kind}.onnx"
            if quantization.mode == "dynamic":
                quantize_dynamic(prepared, output, per_channel=quantization.per_channel, weight_type=QuantType.QInt8,
                                 use_external_data_format=large)
            else:
                if calibration is None:
                    raise ValueError("static quantization needs calibration samples")
                method, options = _calibration_method(quantization.ranges)
                quantize_static(prepared, output, None if ranges.exists() else _reader(calibration),
                                quant_format=QuantFormat.QDQ, per_channel=quantization.per_channel,
                                activation_type=QuantType.QUInt8 if kind == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8, use_external_data_format=large,
                                calibration_cache_path=ranges, nodes_to_exclude=kept_float,
                                calibrate_method=method, extra_options=options)
            quantized = onnx.load_model(output)
            quantized.producer_name, quantized.producer_version = model.producer_name, model.producer_version
            results[kind] = quantized
    return results


class QuantizedTimer:
    """A `timing.Timer` that times every model in its deployed int8 form: quantized by `quantize` with the recipe
    (static: calibrated on the very feeds it is timed on; the scales do not change which kernels run), then timed by
    `inner`. So every time the planning measures — a layer's dense and factorized forms, the probes, the whole
    model against the original in the never-slower check, the judge's plans — is a time of what is deployed: quantized
    dense and quantized factorized layers have other ratios than float ones. A model already quantized, or without a
    weighted layer (the per-node overhead's Identity), is timed as it is. Quantized models are remembered by their
    bytes and feeds (`_QUANTIZED`), so the original, timed again in every comparison, is quantized once."""

    def __init__(self, inner, quantization: Quantization):
        self.inner, self.quantization = inner, quantization.planning

    def time(self, models, feeds, rounds, warmup=1, block_s=0.0):
        deployed = [self.deployed(model, own) for model, own in zip(models, feeds)]
        return self.inner.time(deployed, feeds, rounds, warmup=warmup, block_s=block_s)

    def deployed(self, model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
        """`model` as it is deployed: quantized, unless it already is or has nothing to quantize."""
        if quantization_ops(model) or not any(node.op_type in _WEIGHTED for node in model.graph.node):
            return model
        if model_size(model) > _EXTERNAL_ABOVE:  # too large to digest in one message: quantized every time
            return quantize(model, self.quantization, list(feeds))
        digest = hashlib.sha256(model.SerializeToString())
        for feed in feeds:
            for name in sorted(feed):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(feed[name]).tobytes())
        key = (digest.hexdigest(), self.quantization)
        if key not in _QUANTIZED:
            _QUANTIZED[key] = quantize(model, self.quantization, list(feeds))
            while len(_QUANTIZED) > _REMEMBERED:
                _QUANTIZED.popitem(last=False)
        _QUANTIZED.move_to_end(key)
        return _QUANTIZED[key]


_REMEMBERED = 8
_QUANTIZED: OrderedDict = OrderedDict()
"""The last `_REMEMBERED` models `QuantizedTimer` quantized, by (digest of bytes and feeds, recipe)."""


@contextmanager
def _quietly() -> Iterator[None]:
    """onnxruntime's quantization tools log to the root logger and let numpy warn, once per tensor (PP-OCRv4 det:
    "Axis 1 is out-of-range for weight 'batch_norm_1.w_0'" hundreds of times while its layers were timed in int8,
    "All-NaN axis encountered" for tensors no sample reached): none of it is the user's to act on, and the results
    are checked (run once before writing, verified). Silenced for the call, restored after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # its Percentile method prints
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        root.setLevel(level)


@contextmanager
def _working_in(folder: str) -> Iterator[None]:
    """onnxruntime's quantization tools write scratch files into the current folder and leave them there (its
    symbolic shape inference: `sym_shape_infer_temp.onnx` and a `<uuid>.data` of the model's size, in the user's
    folder, found after a benchmark run): they run inside our temporary folder, removed with it. Our paths are
    absolute; nothing else of ours runs meanwhile."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def weightless_tail(model: onnx.ModelProto) -> list[str]:
    """The nodes no weighted layer (Conv, Gemm, MatMul) reads from, directly or not: the post-processing after the
    last one. Static QDQ leaves them in float: they hold no weight to shrink, and they are where one quantization
    scale would span values of different ranges (YOLOv8n concatenates boxes in pixels with class scores in [0, 1]:
    quantized, its box F1 against the original fell to 0.55; with the tail in float, 0.85)."""
    nodes = list(model.graph.node)
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    feeds_weighted = [False] * len(nodes)
    for index in reversed(range(len(nodes))):  # topological order: readers come later
        feeds_weighted[index] = any(nodes[reader].op_type in _WEIGHTED or feeds_weighted[reader]
                                    for output in nodes[index].output for reader in readers.get(output, ()))
    return [node.name for node, weighted in zip(nodes, feeds_weighted)
            if node.op_type not in _WEIGHTED and not weighted and node.name]


def _preprocess(source: Path, output: Path, large: bool, symbolic: bool = True) -> None:
    """onnxruntime's recommended preprocessing; without its symbolic shape inference when that cannot finish (or
    did not on the original: `symbolic` False)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = dict(save_as_external_data=large, all_tensors_to_one_file=True,
                   external_data_location="prepared.data" if large else None)
    if symbolic:
        try:
            quant_pre_process(str(source), str(output), **options)
            return
        except Exception:  # "Incomplete symbolic shape inference" (YOLOv8n): ONNX's shape inference alone
            pass
    quant_pre_process(str(source), str(output), skip_symbolic_shape=True, **options)


def with_shapes(quantization: Quantization, model: onnx.ModelProto) -> Quantization:
    """The recipe, knowing whether onnxruntime's symbolic shape inference finishes on `model` (the original). It did
    not on YOLOv8n or either PP-OCRv4 model, after 0.25-2.4 s each time (then ONNX's shape inference alone is used,
    to the same result); every model quantized by the recipe is the original with layers rewritten, the op that
    stops it still in it, so they all skip it: on PP-OCRv4 det the judge's 32 quantizations spent 58 s in it."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    if model_size(model) > _EXTERNAL_ABOVE:
        return quantization  # onnxruntime infers it from the file; try it every time
    if quantization.upgraded_from is not None and default_opset(model) < quantization.opset:
        model = upgrade_opset(model, quantization.opset)  # as it will be quantized
    try:  # in our temporary folder: when it cannot finish it leaves its scratch files in the current one
        with tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-") as folder, _working_in(folder), _quietly():
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # whatever it does to its input stays off the user's model
            SymbolicShapeInference.infer_shapes(copy)  # quant_pre_process's defaults
        finishes = True
    except Exception:
        finishes = False
    return replace(quantization, symbolic_shapes=finishes)


def _calibration_method(ranges: str) -> tuple[object, dict[str, object]]:
    """onnxruntime's calibration method and options for `ranges` (one of `RANGES`). Both collect one sample at a
    time (its strided collection, merged exactly: min of minima, one histogram): otherwise onnxruntime holds every
    sample's activations at once, and its histograms cost twice the time (PP-OCRv4 rec, 16 lines: 7.0 s against
    13.1 s)."""
    from onnxruntime.quantization import CalibrationMethod

    if ranges not in RANGES:
        raise ValueError(f"ranges must be one of {RANGES}; got {ranges!r}")
    if ranges == "minmax":
        return CalibrationMethod.MinMax, {"CalibStridedMinMax": 1}
    return CalibrationMethod.Percentile, {"CalibPercentile": float(ranges.split("-")[1]), "CalibStridedMinMax": 1}


def _reader(feeds: Samples | Sequence[Mapping[str, np.ndarray]]):
    """onnxruntime's CalibrationDataReader over our samples: one feed dict per call, None at the end of the range
    onnxruntime's strided collection asked for (`set_range`: consecutive ranges, read as they come). Streamed, so
    samples read from files are read one at a time (`inputs.Samples`)."""
    from onnxruntime.quantization import CalibrationDataReader

    count = feeds.count if isinstance(feeds, Samples) else len(feeds)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds, self._position, self._end = iter(feeds), 0, count

        def __len__(self) -> int:
            return count

        def set_range(self, start_index: int, end_index: int) -> None:
            if start_index != self._position:
                raise ValueError(f"samples are streamed in order: asked for {start_index}, at {self._position}")
            self._end = min(end_index, count)

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._position >= self._end:
                return None
            self._position += 1
            feed = next(self._feeds, None)
            return None if feed is None else dict(feed)

    return Reader()
