"""Hostile and broken files, through the command line: one clear line, exit 2, nothing written, input untouched.

Every file is generated here: a two-layer MatMul model saved with its weights as external data, then damaged in one
way per case. Each case runs `onnx-lowrank compress` black-box and compares every file under the test folder before
and after (so a written output, a stray temporary file or a modified input all fail).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from onnx_lowrank.cli.main import main

from helpers.builders import build_matmul
from helpers.files import save_external


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at `path` to `location`."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def _with_opset(version: int) -> onnx.ModelProto:
    model = build_matmul()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", version))
    return model


def _absolute_location(folder: Path) -> Path:
    model = save_external(build_matmul(), folder / "m.onnx")
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    os.replace(folder / "m.onnx.data", elsewhere / "w.data")
    _relocate(model, str(elsewhere / "w.data"))
    return model


def _data_moved_up(folder: Path) -> Path:
    """inner/m.onnx, whose data file has been moved up to w.data (its tensors still name m.onnx.data)."""
    inner = folder / "inner"
    inner.mkdir()
    model = save_external(build_matmul(), inner / "m.onnx")
    os.replace(inner / "m.onnx.data", folder / "w.data")
    return model


def _parent_location(folder: Path) -> Path:
    model = _data_moved_up(folder)
    _relocate(model, "../w.data")
    return model


def _symlink_escape(folder: Path) -> Path:
    model = _data_moved_up(folder)
    (folder / "inner" / "m.onnx.data").symlink_to(folder / "w.data")
    return model


def _truncated_model(folder: Path) -> Path:
    path = folder / "m.onnx"
    raw = build_matmul().SerializeToString()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _truncated_data(folder: Path) -> Path:
    model = save_external(build_matmul(), folder / "m.onnx")
    data = folder / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return model


def _missing_data(folder: Path) -> Path:
    model = save_external(build_matmul(), folder / "m.onnx")
    (folder / "m.onnx.data").unlink()
    return model


def _empty(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(b"")
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.write_text("this is a README, not a model\n" * 20)
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _zip_file(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    return path


def _unknown_opset(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(_with_opset(99).SerializeToString())
    return path


def _op_newer_than_its_opset(folder: Path) -> Path:
    """Gelu exists from opset 20; a model stamped opset 13 cannot use it."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")])
    path = folder / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    return path


def _future_ir_version(folder: Path) -> Path:
    model = build_matmul()
    model.ir_version = 99
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _directory(folder: Path) -> Path:
    path = folder / "m.onnx"
    path.mkdir()
    (path / "model.onnx").write_bytes(build_matmul().SerializeToString())
    return path


BROKEN_INPUTS = {
    "external data at an absolute path": _absolute_location,
    "external data in the parent folder (..)": _parent_location,
    "external data through a symlink leading out": _symlink_escape,
    "truncated model file": _truncated_model,
    "truncated external data file": _truncated_data,
    "missing external data file": _missing_data,
    "empty file": _empty,
    "text file": _text_file,
    "random bytes": _random_bytes,
    "zip archive": _zip_file,
    "unknown opset 99": _unknown_opset,
    "operator newer than the model's opset": _op_newer_than_its_opset,
    "IR version from the future": _future_ir_version,
    "a folder instead of a file": _directory,
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a digest of its bytes (links by target, folders by name)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = "-> " + os.readlink(path)
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            result[key] = "folder"
    return result


def _refused(argv: list[str], folder: Path, capsys) -> str:
    """Run the CLI; assert exit 2, one line on stderr, and no file changed or added under `folder`."""
    before = _snapshot(folder)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-lowrank: error: "), err
    assert _snapshot(folder) == before
    return lines[0]


@pytest.mark.parametrize("make", BROKEN_INPUTS.values(), ids=BROKEN_INPUTS.keys())
def test_broken_input_is_refused_in_one_line(tmp_path, capsys, make):
    model = make(tmp_path)
    output = tmp_path / "out" / "c.onnx"
    output.parent.mkdir()
    _refused(["compress", str(model), str(output), "--budget", "0.5", "--allow-slower", "--quiet"], tmp_path, capsys)
    assert not output.exists()


@pytest.mark.parametrize("case", ["absolute", "parent", "symlink"])
def test_escaping_external_data_is_named_in_the_message(tmp_path, capsys, case):
    make = {"absolute": _absolute_location, "parent": _parent_location, "symlink": _symlink_escape}[case]
    model = make(tmp_path)
    line = _refused(["compress", str(model), str(tmp_path / "c.onnx"), "--budget", "0.5", "--allow-slower",
                     "--quiet"], tmp_path, capsys)
    assert "outside the model's folder" in line


def _spellings(folder: Path, model: Path) -> dict[str, Path]:
    (folder / "link.onnx").symlink_to(model)
    (folder / "sub").mkdir()
    return {
        "same path": model,
        "with ./": folder / "." / model.name,
        "through ..": folder / "sub" / ".." / model.name,
        "a symlink to it": folder / "link.onnx",
        "relative": Path(os.path.relpath(model)),
    }


@pytest.mark.parametrize("spelling", ["same path", "with ./", "through ..", "a symlink to it", "relative"])
def test_output_equal_to_the_input_is_refused(tmp_path, capsys, spelling):
    model = tmp_path / "m.onnx"
    model.write_bytes(build_matmul().SerializeToString())
    output = _spellings(tmp_path, model)[spelling]
    line = _refused(["compress", str(model), str(output), "--budget", "0.5", "--allow-slower", "--quiet"],
                    tmp_path, capsys)
    assert "is the input model" in line


def test_output_over_the_inputs_external_data_is_refused(tmp_path, capsys):
    """Writing c.onnx would also write c.onnx.data, which here is the input model's weights."""
    model = tmp_path / "m.onnx"
    onnx.save_model(build_matmul(), str(model), save_as_external_data=True, location="c.onnx.data",
                    size_threshold=0)
    _refused(["compress", str(model), str(tmp_path / "c.onnx"), "--budget", "0.5", "--allow-slower", "--quiet",
              "--save-as-external-data"], tmp_path, capsys)


def test_missing_output_folder_is_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(build_matmul().SerializeToString())
    line = _refused(["compress", str(model), str(tmp_path / "nowhere" / "c.onnx"), "--budget", "0.5",
                     "--allow-slower", "--quiet"], tmp_path, capsys)
    assert "does not exist" in line


def _unwritable_folders(tmp_path: Path) -> list[Path]:
    """A folder without write permission (binding unless we are root) and, on Linux, a pseudo file system that
    refuses new files even to root."""
    folders = []
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        folders.append(locked)
    if sys.platform.startswith("linux"):
        folders.append(Path("/proc"))
    return folders


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(build_matmul().SerializeToString())
    folders = _unwritable_folders(tmp_path)
    if not folders:
        pytest.skip("no folder this user cannot write to")
    for folder in folders:
        line = _refused(["compress", str(model), str(folder / "c.onnx"), "--budget", "0.5", "--allow-slower",
                         "--quiet"], tmp_path, capsys)
        assert "not writable" in line
        assert not (folder / "c.onnx").exists()


@pytest.mark.parametrize("argv", [
    "compress {m} {o} --budget 0.5 --no-such-flag",
    "compress {m} {o} --budget 0.5 --metric bytes",
    "compress {m} --budget 0.5",
    "compress {m} {o}",
    "",
], ids=["unknown flag", "bad --metric choice", "missing output", "missing budget", "no command"])
def test_usage_errors_are_one_line(tmp_path, capsys, argv):
    model = tmp_path / "m.onnx"
    model.write_bytes(build_matmul().SerializeToString())
    line = _refused(argv.format(m=model, o=tmp_path / "c.onnx").split(), tmp_path, capsys)
    assert "usage:" not in line


def test_an_unexpected_exception_is_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    """A bug of ours reaches the user as one line asking for a report, not a traceback; nothing is written."""
    import onnx_lowrank.api

    def broken(*args, **kwargs):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(onnx_lowrank.api, "compress", broken)
    model = tmp_path / "m.onnx"
    model.write_bytes(build_matmul().SerializeToString())
    before = _snapshot(tmp_path)
    assert main(["compress", str(model), str(tmp_path / "c.onnx"), "--budget", "0.5", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err == "onnx-lowrank: internal error: RuntimeError: something went wrong; please report it\n"
    assert _snapshot(tmp_path) == before
