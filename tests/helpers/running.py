"""Running what the tests build: a model in onnxruntime, two models against each other, the command line."""

from __future__ import annotations

import contextlib
import io
import traceback

import numpy as np
import onnx


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, threads: int | None = None) -> list[np.ndarray]:
    """Every output of `model` on `feeds`, in onnxruntime's CPU provider (`threads` intra- and inter-op threads when
    given, onnxruntime's default otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(model: onnx.ModelProto, changed: onnx.ModelProto, feeds, tolerance: float = 1e-5) -> None:
    """Every output of `changed` within `tolerance` (relative L2) of `model`'s on every feed, in onnxruntime."""
    from onnx_lowrank.graph import runtime

    before, after = runtime.session(model), runtime.session(changed)
    for feed in feeds:
        expected, got = runtime.run(before, feed), runtime.run(after, feed)
        for name, value in expected.items():
            assert np.linalg.norm(got[name] - value) <= tolerance * max(np.linalg.norm(value), 1e-6), name


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`; an exception escaping main fails the test with its traceback."""
    from onnx_lowrank.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included: main must return
            raise AssertionError(f"main({argv}) raised:\n{traceback.format_exc()}\nstderr:\n{err.getvalue()}")
    return code, out.getvalue(), err.getvalue()
