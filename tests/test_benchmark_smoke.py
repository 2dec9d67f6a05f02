"""The benchmark runner still runs end to end (one model, one budget, a weight-only and a calibrated method), so it
cannot rot."""

from __future__ import annotations

import re

import pytest

from benchmarks import run


@pytest.mark.slow
def test_runner_writes_results_and_plot(tmp_path):
    code = run.main(["--models", "ppocr-cls", "--budgets", "0.7", "--methods", "weight alds,data auto",
                     "--repeats", "2", "--out", str(tmp_path)])
    assert code == 0
    results = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in results.splitlines() if re.match(r"\| (weight alds|data auto \(\w+\)) \| 0\.7 \|", line)]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        params, flops, latency, task, out_err = (float(c) for c in cells[2:7])
        assert 0.6 < params <= 0.7 and 0 < flops <= 1 and latency > 0 and 0 <= task <= 1 and out_err >= 0
    assert "Default (`data auto`) against weight-only: 0.7: out err" in results
    assert "![ppocr-cls frontier](plots/ppocr-cls.png)" in results
    assert (tmp_path / "plots" / "ppocr-cls.png").stat().st_size > 10_000


def test_unknown_model_is_refused(capsys):
    assert run.main(["--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
