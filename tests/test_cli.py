"""The command line: exit codes, what is (and is not) written, stderr, determinism; in-process and as a program."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.builders import CNN_LAYERS, build_cnn, build_depthwise_only, build_relu_only
from helpers.files import save, sha256
from helpers.running import run

from onnx_lowrank.cli.main import main

PREFIX = "onnx-lowrank: error:"
FAST = ["--allow-slower"]  # the toy layers are never faster factorized: lift the never-slower guard


def _listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256: what a failed run must leave untouched."""
    return {str(p.relative_to(folder)): sha256(p) if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def _one_error_line(err: str) -> str:
    """The error line on stderr; fails unless there is exactly one non-blank line and it has the prefix."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert len(lines[0]) > len(PREFIX) + 10  # says something
    return lines[0]


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder with the CNN model, a nothing-to-compress model, and broken files."""
    model = build_cnn()
    save(model, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "tensor.onnx").write_bytes(onnx.numpy_helper.from_array(np.ones(4, np.float32), "t").SerializeToString())
    (tmp_path / "nograph.onnx").write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    np.savez(tmp_path / "wrongkey.npz", images=np.zeros((1, 3, 16, 16), np.float32))
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(1).random((1, 3, 16, 16)).astype(np.float32))
    (tmp_path / "plan_unknown.json").write_text(json.dumps({"layers": {"nope": {"k": 1, "rank": 2}}}))
    (tmp_path / "plan_rank.json").write_text(json.dumps({"layers": {"conv1": {"k": 1, "rank": 99}}}))
    (tmp_path / "plan_k.json").write_text(json.dumps({"layers": {"conv1": {"k": 2, "rank": 1}}}))
    (tmp_path / "plan_zero.json").write_text(json.dumps({"layers": {"conv1": {"k": 1, "rank": 0}}}))
    (tmp_path / "plan_broken.json").write_text('{"layers": ')
    (tmp_path / "plan_list.json").write_text("[1, 2]")
    (tmp_path / "out").mkdir()
    return tmp_path


# ---------------------------------------------------------------------------------------------------------- success


def test_compress_writes_model_report_and_plan(workdir, capsys):
    source = workdir / "m.onnx"
    digest = sha256(source)
    out, report, plan = workdir / "out" / "c.onnx", workdir / "out" / "r.json", workdir / "out" / "p.json"
    code = main(["compress", str(source), str(out), "--budget", "0.5", "--report", str(report), "--plan-out", str(plan),
                 *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sha256(source) == digest
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["c.onnx", "p.json", "r.json"]
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    (y,) = run(model, {"x": x})
    assert y.shape == (1, 10)

    data = json.loads(report.read_text())
    assert {"summary", "layers", "skipped", "verification", "seconds", "plan"} <= set(data)
    assert data["summary"]["params_ratio"] <= 0.5
    assert [row["name"] for row in data["layers"]] == list(CNN_LAYERS)
    assert data["verification"] is not None and data["verification"]["worst_relative_l2"] > 0
    assert data["skipped"] == []
    assert all(isinstance(v, float) for v in data["seconds"].values())

    saved_plan = json.loads(plan.read_text())
    assert saved_plan["format"] == "onnx-lowrank-plan"
    assert saved_plan["layers"] == data["plan"]["layers"]
    assert set(saved_plan["layers"]) <= set(CNN_LAYERS) and saved_plan["layers"]
    assert "c.onnx" in captured.out


def test_quiet_prints_nothing(workdir, capsys):
    out = workdir / "out" / "c.onnx"
    assert main(["compress", str(workdir / "m.onnx"), str(out), "--budget", "0.5", "--quiet", *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert out.exists()


def test_no_verify_report_has_no_verification(workdir, capsys):
    out, report = workdir / "out" / "c.onnx", workdir / "out" / "r.json"
    assert main(["compress", str(workdir / "m.onnx"), str(out), "--budget", "0.6", "--no-verify",
                 "--report", str(report), "--quiet", *FAST]) == 0
    assert json.loads(report.read_text())["verification"] is None


@pytest.mark.parametrize("options", [
    ["--metric", "flops"],
    ["--allocator", "uniform"],
    ["--allocator", "energy"],
    ["--rank-multiple", "8"],
    ["--max-groups", "1"],
    ["--exclude", "^fc"],
    ["--inputs", "good.npz"],
    ["--max-error", "100"],
])
def test_compress_options(workdir, capsys, options):
    options = [str(workdir / o) if o.endswith(".npz") else o for o in options]
    out, report = workdir / "out" / "c.onnx", workdir / "out" / "r.json"
    code = main(["compress", str(workdir / "m.onnx"), str(out), "--budget", "0.6", "--report", str(report),
                 "--quiet", *options, *FAST])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    ratio_key = "flops_ratio" if "flops" in options else "params_ratio"
    assert data["summary"][ratio_key] <= 0.6
    ranks = [row for row in data["layers"] if row["rank"] is not None]
    assert ranks
    if "--rank-multiple" in options:
        assert all(row["rank"] % 8 == 0 for row in ranks)
    if "--max-groups" in options or "--allocator" in options:
        assert all(row["k"] == 1 for row in ranks)
    if "--exclude" in options:
        assert {s["name"] for s in data["skipped"]} == {"fc1", "fc2"}
    if "--inputs" in options:
        assert data["verified_on"] == str(workdir / "good.npz")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_flops_with_input_shape_on_a_dynamic_model(tmp_path, capsys):
    source = save(build_cnn(input_shape=("N", 3, "H", "W")), tmp_path / "dyn.onnx")
    out, report = tmp_path / "c.onnx", tmp_path / "r.json"
    code = main(["compress", str(source), str(out), "--budget", "0.5", "--metric", "flops",
                 "--input-shape", "x:1x3x16x16", "--report", str(report), "--quiet", *FAST])
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["summary"]["flops_ratio"] <= 0.5
    # without the shape: exit 2, asks for --input-shape, nothing written
    out.unlink()
    code = main(["compress", str(source), str(out), "--budget", "0.5", "--metric", "flops", "--quiet"])
    assert code == 2
    assert "--input-shape" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_two_runs_give_identical_bytes(workdir, capsys):
    a, b = workdir / "out" / "a.onnx", workdir / "out" / "b.onnx"
    for target in (a, b):
        assert main(["compress", str(workdir / "m.onnx"), str(target), "--budget", "0.5", "--quiet", *FAST]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_plan_out_then_apply_reproduces_the_model(workdir, capsys):
    source = workdir / "m.onnx"
    compressed, plan, applied = workdir / "out" / "c.onnx", workdir / "out" / "p.json", workdir / "out" / "a.onnx"
    assert main(["compress", str(source), str(compressed), "--budget", "0.6", "--plan-out", str(plan), "--quiet",
                 *FAST]) == 0
    code = main(["apply", str(source), str(applied), "--plan", str(plan), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert applied.read_bytes() == compressed.read_bytes()


def test_nothing_to_compress_writes_the_model_unchanged(tmp_path, capsys):
    source = save(build_relu_only(), tmp_path / "relu.onnx")
    out = tmp_path / "out.onnx"
    code = main(["compress", str(source), str(out), "--budget", "0.5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes() == source.read_bytes()
    assert "nothing to compress" in captured.out.lower()


def test_all_layers_skipped_is_nothing_to_compress(tmp_path, capsys):
    """Only a depthwise Conv: nothing to compress -> exit 0, model written unchanged, message says why."""
    source = save(build_depthwise_only(), tmp_path / "dw.onnx")
    out = tmp_path / "out.onnx"
    code = main(["compress", str(source), str(out), "--budget", "0.5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes() == source.read_bytes()
    assert "group" in captured.out.lower()


def test_budget_one_writes_the_model_unchanged(workdir, capsys):
    out = workdir / "out" / "c.onnx"
    assert main(["compress", str(workdir / "m.onnx"), str(out), "--budget", "1", *FAST]) == 0
    assert out.read_bytes() == (workdir / "m.onnx").read_bytes()
    assert "unchanged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- exit 1: --max-error


def test_max_error_exceeded_exits_1_writes_no_model_but_the_report(workdir, capsys):
    source = workdir / "m.onnx"
    digest = sha256(source)
    out, report, plan = workdir / "out" / "c.onnx", workdir / "out" / "r.json", workdir / "out" / "p.json"
    code = main(["compress", str(source), str(out), "--budget", "0.5", "--max-error", "0", "--report", str(report),
                 "--plan-out", str(plan), "--quiet", *FAST])
    captured = capsys.readouterr()
    assert code == 1
    assert not out.exists()
    assert report.exists()
    assert json.loads(report.read_text())["verification"]["worst_relative_l2"] > 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "max-error" in lines[0]
    assert sha256(source) == digest
    assert [p.name for p in (workdir / "out").iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------------ exit 2: bad input

# (name, argv with {w} for the work folder); every case must exit 2, print one error line and write nothing.
BAD_INPUT = [
    ("missing input", "compress {w}/missing.onnx {w}/out/c.onnx --budget 0.5"),
    ("garbage bytes", "compress {w}/garbage.onnx {w}/out/c.onnx --budget 0.5"),
    ("empty file", "compress {w}/empty.onnx {w}/out/c.onnx --budget 0.5"),
    ("truncated model", "compress {w}/truncated.onnx {w}/out/c.onnx --budget 0.5"),
    ("tensor not model", "compress {w}/tensor.onnx {w}/out/c.onnx --budget 0.5"),
    ("model without graph", "compress {w}/nograph.onnx {w}/out/c.onnx --budget 0.5"),
    ("input is a folder", "compress {w}/out {w}/out/c.onnx --budget 0.5"),
    ("budget 0", "compress {w}/m.onnx {w}/out/c.onnx --budget 0"),
    ("budget 1.5", "compress {w}/m.onnx {w}/out/c.onnx --budget 1.5"),
    ("budget negative", "compress {w}/m.onnx {w}/out/c.onnx --budget -0.5"),
    ("budget nan", "compress {w}/m.onnx {w}/out/c.onnx --budget nan"),
    ("budget unreachable", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.001"),
    ("bad input shape", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --input-shape x:1xfoox16"),
    ("input shape no name", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --input-shape 1x3x16x16"),
    ("unknown input name", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --input-shape images:1x3x16x16"),
    ("input shape wrong rank", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --input-shape x:1x3x16"),
    ("output is input", "compress {w}/m.onnx {w}/m.onnx --budget 0.5"),
    ("output folder missing", "compress {w}/m.onnx {w}/nowhere/c.onnx --budget 0.5"),
    ("output not .onnx", "compress {w}/m.onnx {w}/out/c.txt --budget 0.5"),
    ("output is a folder", "compress {w}/m.onnx {w}/out --budget 0.5"),
    ("bad exclude regex", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --exclude ("),
    ("npz wrong key", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --inputs {w}/wrongkey.npz"),
    ("inputs missing", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --inputs {w}/none.npz"),
    ("max groups 0", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --max-groups 0"),
    ("rank multiple 0", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --rank-multiple 0"),
    ("max error negative", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --max-error -1"),
    ("report folder missing", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --report {w}/nowhere/r.json"),
    ("plan-out folder missing", "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --plan-out {w}/nowhere/p.json"),
    ("plan missing", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/none.json"),
    ("plan malformed json", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_broken.json"),
    ("plan not an object", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_list.json"),
    ("plan unknown layer", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_unknown.json"),
    ("plan rank out of range", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_rank.json"),
    ("plan rank zero", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_zero.json"),
    ("plan k does not divide", "apply {w}/m.onnx {w}/out/c.onnx --plan {w}/plan_k.json"),
    ("apply garbage model", "apply {w}/garbage.onnx {w}/out/c.onnx --plan {w}/plan_rank.json"),
    ("analyze missing", "analyze {w}/missing.onnx"),
    ("analyze truncated", "analyze {w}/truncated.onnx"),
    ("analyze bad exclude", "analyze {w}/m.onnx --exclude ("),
]


@pytest.mark.parametrize("argv", [case[1] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdir, capsys, argv):
    before = _listing(workdir)
    code = main(argv.format(w=workdir).split() + ["--quiet"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    _one_error_line(captured.err)
    assert _listing(workdir) == before  # no output, no temp file, input untouched


def test_bad_input_stderr_is_exactly_one_line_without_quiet(workdir, capsys):
    """Without --quiet too, stderr holds the error line and nothing else (no blank line from the progress bar)."""
    for argv in (
        ["compress", str(workdir / "m.onnx"), str(workdir / "out" / "c.onnx"), "--budget", "0.001"],
        ["compress", str(workdir / "garbage.onnx"), str(workdir / "out" / "c.onnx"), "--budget", "0.5"],
        ["compress", str(workdir / "m.onnx"), str(workdir / "out" / "c.onnx"), "--budget", "1.5"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and err.startswith(PREFIX), repr(err)
    assert list((workdir / "out").iterdir()) == []


def test_unreachable_budget_message_names_the_range(workdir, capsys):
    # --allow-slower: which toy layers the never-slower guard keeps depends on this machine's timings
    assert main(["compress", str(workdir / "m.onnx"), str(workdir / "out" / "c.onnx"), "--budget", "0.001",
                 "--quiet", "--allow-slower"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "0.001" in line and "to 1.0" in line


def test_unreachable_budget_under_the_guard_says_why(workdir, capsys):
    """With timing, the toy layers may have no form measured faster (then: why), or some (then: the range)."""
    assert main(["compress", str(workdir / "m.onnx"), str(workdir / "out" / "c.onnx"), "--budget", "0.001",
                 "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "0.001" in line and ("to 1.0" in line or "can only stay as it is" in line)
    assert "--allow-slower lifts that" in line


def test_malformed_plan_values_exit_2(workdir, capsys):
    """k or rank given as JSON booleans (or other non-numbers) is a malformed plan, not a crash."""
    for entry in ({"k": True, "rank": 2}, {"k": 1, "rank": "2"}, {"k": 1.5, "rank": 2}, [1, 2]):
        plan = workdir / "plan_bad.json"
        plan.write_text(json.dumps({"layers": {"conv2": entry}}))
        before = _listing(workdir)
        code = main(["apply", str(workdir / "m.onnx"), str(workdir / "out" / "c.onnx"), "--plan", str(plan), "--quiet"])
        assert code == 2, entry
        _one_error_line(capsys.readouterr().err)
        assert _listing(workdir) == before


@pytest.mark.parametrize("option", ["--plan-out", "--report"])
def test_side_file_that_is_a_folder_exits_2_and_writes_no_model(workdir, capsys, option):
    folder = workdir / "out" / "taken"
    folder.mkdir()
    out = workdir / "out" / "c.onnx"
    before = _listing(workdir)
    code = main(["compress", str(workdir / "m.onnx"), str(out), "--budget", "0.5", option, str(folder), "--quiet"])
    assert code == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert _listing(workdir) == before


@pytest.mark.parametrize("argv", [
    "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --metric bytes",
    "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --allocator random",
    "compress {w}/m.onnx {w}/out/c.onnx",
    "compress {w}/m.onnx {w}/out/c.onnx --budget half",
    "compress {w}/m.onnx --budget 0.5",
    "compress {w}/m.onnx {w}/out/c.onnx --budget 0.5 --max-groups two",
    "apply {w}/m.onnx {w}/out/c.onnx",
    "frobnicate {w}/m.onnx",
    "",
], ids=["unknown metric", "unknown allocator", "no budget", "budget not a number", "no output", "max-groups text",
        "apply without plan", "unknown command", "no command"])
def test_usage_errors_exit_2_and_write_nothing(workdir, capsys, argv):
    before = _listing(workdir)
    assert main(argv.format(w=workdir).split()) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-lowrank: error:") and len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert _listing(workdir) == before


def test_input_is_never_modified(workdir, capsys):
    source = workdir / "m.onnx"
    digest = sha256(source)
    mtime = source.stat().st_mtime_ns
    main(["compress", str(source), str(workdir / "out" / "a.onnx"), "--budget", "0.5", "--quiet", *FAST])
    main(["compress", str(source), str(source), "--budget", "0.5", "--quiet", *FAST])
    main(["compress", str(source), str(workdir / "out" / "b.onnx"), "--budget", "0.5", "--max-error", "0", "--quiet",
          *FAST])
    main(["analyze", str(source), "--quiet", *FAST])
    assert sha256(source) == digest
    assert source.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------------------- analyze


def test_analyze_prints_a_table(workdir, capsys):
    code = main(["analyze", str(workdir / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in CNN_LAYERS:
        assert name in captured.out
    assert "5 factorizable layers" in captured.out
    assert [p.name for p in (workdir / "out").iterdir()] == []


def test_analyze_report_json(workdir, capsys):
    report = workdir / "out" / "a.json"
    assert main(["analyze", str(workdir / "m.onnx"), "--report", str(report), "--quiet", *FAST]) == 0
    data = json.loads(report.read_text())
    assert [layer["name"] for layer in data["layers"]] == list(CNN_LAYERS)
    assert data["never_slower_guard"] is False  # --allow-slower
    assert sum(layer["dense"]["params"] for layer in data["layers"]) <= data["totals"]["params"]
    assert all(layer["candidates"] for layer in data["layers"])
    assert all(c["params"] < layer["dense"]["params"] for layer in data["layers"] for c in layer["candidates"])


# ------------------------------------------------------------------------------------------------------- as programs


def _console_script() -> str:
    beside = Path(sys.executable).with_name("onnx-lowrank")
    found = str(beside) if beside.exists() else shutil.which("onnx-lowrank")
    assert found, "the onnx-lowrank console script is not installed"
    return found


def test_python_m_and_console_script_match_in_process(workdir, capsys):
    source = workdir / "m.onnx"
    reference = workdir / "out" / "ref.onnx"
    assert main(["compress", str(source), str(reference), "--budget", "0.5", "--quiet", *FAST]) == 0
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    for name, command in (("m", [sys.executable, "-m", "onnx_lowrank"]), ("script", [_console_script()])):
        out = workdir / "out" / f"{name}.onnx"
        result = subprocess.run([*command, "compress", str(source), str(out), "--budget", "0.5", *FAST],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "wrote" in result.stdout
        assert out.read_bytes() == reference.read_bytes()


def test_programs_exit_codes(workdir):
    env = {**os.environ}
    bad = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(workdir / "garbage.onnx"),
                          str(workdir / "out" / "c.onnx"), "--budget", "0.5", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith(PREFIX) and bad.stderr.count("\n") == 1
    usage = subprocess.run([_console_script(), "compress", str(workdir / "m.onnx")], capture_output=True, text=True,
                           env=env, timeout=120)
    assert usage.returncode == 2
    analyze = subprocess.run([_console_script(), "analyze", str(workdir / "m.onnx")], capture_output=True, text=True,
                             env=env, timeout=120)
    assert analyze.returncode == 0, analyze.stderr
    assert "conv3" in analyze.stdout
    assert list((workdir / "out").iterdir()) == []
