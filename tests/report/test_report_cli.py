"""``kiln explain`` from the command line, with a pass from a plugin (``examples/write_a_pass.py``) in the
pipeline: the pass shows in the report's per-pass table with what it changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_explain_shows_the_example_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "mamba.html"
    rc = main(["explain", "examples/models/mamba.py:make_model", "--plugin", "examples/write_a_pass.py",
               "-O", "O1,square-to-mul", "--no-measure", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "passes: canonicalize, constant-fold, cse, dce, square-to-mul" in stdout and f"wrote {out}" in stdout
    html = out.read_text()
    row = re.search(r"<tr>[^\n]*?<td>square-to-mul</td>.*?</tr>", html)
    assert row is not None
    assert "<td>yes</td>" in row.group(0) and "rewrites=3" in row.group(0)  # the zoo's Mamba squares 3 times
    assert "aten.pow" not in html.split('id="graphs"')[1].split("after the pipeline")[1].split("</details>")[0]


@pytest.mark.parametrize("args, message", [
    (["explain", "examples/models/mlp.py:make_model", "-O", "O1,square-to-mull"], "unknown pass or pipeline"),
    (["explain", "examples/models/mlp.py:make_model", "--target", "nope"], "unknown target 'nope'"),
    (["explain", "examples/models/mlp.py:nope"], "has no attribute 'nope'"),
    (["explain", "examples/models/mlp.py:make_model", "--plugin", "no/such/plugin.py"],
     "--plugin no/such/plugin.py: no such file"),
    (["explain", "examples/models/mlp.py:make_model", "--example-inputs", "f32[4,"], "bad --example-inputs spec"),
])
def test_explain_user_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "r.html"
    assert main([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: error: ") and message in err[0], err
    assert not out.exists()


def test_bench_cli_without_inductor(tmp_path, monkeypatch, capsys):
    import json

    import torch

    monkeypatch.chdir(REPO)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "examples/models/mlp.py:make_model", "--size", "small", "--no-inductor", "--reps", "3",
                   "--warmup", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| mlp |" in stdout and "summary: speedup_vs_eager_geomean=" in stdout
    assert "roofline peaks: measured" in stdout
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["kiln_correct"] and row["reps"] == 3 and "inductor_ms" not in row
    assert doc["summary"]["all_correct"] and doc["model_ref"].endswith("examples/models/mlp.py:make_model")
    assert doc["machine"]["source"].startswith("measured in this run (1 threads)")
