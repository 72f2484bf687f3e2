"""The ``kiln`` CLI: compile -> run --check through both entry points (``python -m kiln.cli`` and the
``kiln`` console script), and one-line ``kiln: error:`` messages with exit code 2 for user errors.

Process-level behaviour is checked with subprocesses; the many error cases run ``kiln.cli.main`` in
this process (same code path, without paying torch's import time per case).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln.cli import main, parse_input_spec

REPO = Path(__file__).resolve().parents[1]
MLP = "examples/models/mlp.py:make_model"


def _kiln_script() -> str:
    script = Path(sys.executable).with_name("kiln")
    if script.exists():
        return str(script)
    found = shutil.which("kiln")
    if found is None:
        pytest.skip("the kiln console script is not installed")
    return found


def _run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("KILN_DEBUG_DIR", None)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_compile_with_module_entry_then_run_check_with_console_script(tmp_path):
    out = tmp_path / "mlp-artifact"
    proc = _run([sys.executable, "-m", "kiln.cli", "compile", MLP, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and str(out) in proc.stdout
    assert "canonicalize" in proc.stdout  # the pass timing table
    assert (out / "manifest.json").is_file() and (out / "inputs.safetensors").is_file()

    # From another directory: the manifest records the model file's absolute path.
    proc = _run([_kiln_script(), "run", str(out), "--check"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "output[0]: f32[4, 10]" in proc.stdout and "sha256=" in proc.stdout
    assert "check: matches eager" in proc.stdout


def test_console_script_error_is_one_line_exit_2(tmp_path):
    proc = _run([_kiln_script(), "compile", "does/not/exist.py:make_model", "-o", str(tmp_path / "x")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["kiln: error: does/not/exist.py: no such file"]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def tiny_models(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(REPO)
    path = tmp_path / "tiny_models.py"
    path.write_text(textwrap.dedent("""
        import torch

        def just_a_model():
            return torch.nn.Linear(8, 4)   # random init: the CLI seeds the RNG, so --check can rebuild it

        def two_outputs(size="small"):
            class Two(torch.nn.Module):
                def forward(self, x, ids):
                    return {"double": x * 2, "rest": (x.sum(), ids + 1)}
            return Two(), (torch.ones(3, 2), torch.arange(3))

        def broken(size="small"):
            raise RuntimeError("cannot build this one")
    """))
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: ")
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["compile", "nope/missing.py:make_model"], "nope/missing.py: no such file"),
    (["compile", "examples/models/mlp.py:make_modle"], "has no attribute 'make_modle'"),
    (["compile", "examples/models/mlp.py"], "expected MODULE:FACTORY"),
    (["compile", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    (["compile", MLP, "-O", "nope"], "unknown pass or pipeline 'nope'"),
    (["compile", MLP, "--target", "gpu9000"], "unknown target 'gpu9000'"),
    (["compile", MLP, "--example-inputs", "f32[2,x]"], "bad --example-inputs spec 'f32[2,x]'"),
    (["compile", MLP, "--example-inputs", "float99[2]"], "unknown dtype 'float99'"),
    (["compile", "{tiny}:broken"], "the factory raised RuntimeError: cannot build this one"),
    (["compile", "{tiny}:just_a_model"], "--example-inputs"),
    (["compile", MLP], "Missing option '-o'"),
    (["run", "{tmp}/no-artifact"], "no such artifact directory"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_user_errors_exit_2_with_one_line(args, message, tiny_models, tmp_path, capsys):
    args = [a.format(tiny=tiny_models, tmp=tmp_path) for a in args]
    if args[0] == "compile" and "-o" not in args and "Missing" not in message:
        args += ["-o", str(tmp_path / "out")]
    assert main(args) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--debug", "run", "{tmp}/none"], ["run", "{tmp}/none", "--debug"]])
def test_debug_shows_traceback(args, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ArtifactError" in err
    assert err.strip().splitlines()[-1].startswith("kiln: error: ")


def test_corrupted_artifact_is_a_user_error(tiny_models, tmp_path, capsys):
    out = tmp_path / "lin"
    assert main(["compile", f"{tiny_models}:just_a_model", "--example-inputs", "f32[2,8]", "-o", str(out)]) == 0
    assert main(["run", str(out), "--check"]) == 0
    assert "check: matches eager" in capsys.readouterr().out
    weights = out / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["run", str(out)]) == 2
    line = _error_line(capsys)
    assert "weights.safetensors" in line and "corrupted" in line


def test_structured_outputs_and_inputs_file(tiny_models, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "two"
    assert main(["compile", f"{tiny_models}:two_outputs", "--size", "bench", "-o", str(out)]) == 0
    capsys.readouterr()
    inputs = tmp_path / "in.safetensors"
    save_file({"input_0": torch.full((3, 2), 2.0), "input_1": torch.arange(3) * 5}, inputs)
    assert main(["run", str(out), "--inputs", str(inputs), "--check"]) == 0
    stdout = capsys.readouterr().out
    assert "output[0]: f32[3, 2] sum=24" in stdout and "output[2]: i64[3] sum=18" in stdout
    save_file({"wrong": torch.ones(3, 2)}, inputs)
    assert main(["run", str(out), "--inputs", str(inputs)]) == 2
    assert "expected tensors named input_0, input_1" in _error_line(capsys)


def test_parse_input_spec():
    import torch

    assert parse_input_spec("f32[2,8];i64[2, 16]") == [(torch.float32, (2, 8)), (torch.int64, (2, 16))]
    assert parse_input_spec("float16[]") == [(torch.float16, ())]
