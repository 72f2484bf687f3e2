"""What a new user does: compile a zoo model with the ``kiln`` command, then load the artifact in a FRESH
Python process (``kiln.load``) and compare with eager PyTorch; and the write-a-pass example, run the way
CI runs it (as a script, and as a ``--plugin`` of ``kiln compile``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LOAD_AND_COMPARE = textwrap.dedent("""
    import sys
    import torch
    assert "kiln" not in sys.modules and "kiln.cli" not in sys.modules
    import kiln
    from examples.models import REGISTRY
    from kiln.numerics import compare

    compiled = kiln.load(sys.argv[1])
    model, inputs = REGISTRY[sys.argv[2]](size="small")
    stored = compiled.example_inputs()
    assert len(stored) == len(inputs) and all(torch.equal(a, b) for a, b in zip(stored, inputs))
    with torch.no_grad():
        msg = compare(compiled(*inputs), model(*inputs))
    assert "kiln.cli" not in sys.modules  # loading needs nothing from the compiler's front end
    print("MATCH" if msg is None else f"MISMATCH {msg}")
""")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    for var in ("KILN_DEBUG_DIR", "KILN_LOGS"):
        env.pop(var, None)
    return env


def _kiln() -> list[str]:
    script = Path(sys.executable).with_name("kiln")
    if script.exists():
        return [str(script)]
    found = shutil.which("kiln")
    return [found] if found else [sys.executable, "-m", "kiln.cli"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env())


@pytest.mark.parametrize("name, file", [
    ("mlp", "mlp"),
    pytest.param("resnet18", "resnet", marks=pytest.mark.slow),
    pytest.param("gpt", "gpt", marks=pytest.mark.slow),
])
def test_cli_compile_then_load_in_a_fresh_process(name, file, tmp_path):
    out = tmp_path / f"{name}-artifact"
    proc = _run([*_kiln(), "compile", f"examples/models/{file}.py:make_model", "-o", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    proc = _run([sys.executable, "-c", LOAD_AND_COMPARE, str(out), name], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "MATCH"


def test_write_a_pass_example_as_a_script():
    proc = _run([sys.executable, "examples/write_a_pass.py"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "square-to-mul: 3 rewrites" in proc.stdout and "outputs match eager" in proc.stdout


@pytest.mark.slow  # the same plugin path runs in-process in tests/report/test_report_cli.py
def test_write_a_pass_example_as_a_cli_plugin(tmp_path):
    out = tmp_path / "mamba"
    proc = _run([*_kiln(), "compile", "examples/models/mamba.py:make_model", "--plugin", "examples/write_a_pass.py",
                 "-O", "O1,square-to-mul", "-o", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "square-to-mul" in proc.stdout  # in the pass timing table
    assert "aten.pow" not in (out / "graph.kir").read_text()
