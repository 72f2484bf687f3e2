"""The ``kiln`` CLI: compile -> run --check through both entry points (``python -m kiln.cli`` and the
``kiln`` console script), and one-line ``kiln: error:`` messages with exit code 2 for user errors;
symbolic shape specs, saved ExportedPrograms (``.pt2``), options that are refused until their issue
lands, and what the manifest records. (``explain``/``bench`` are in tests/report, ``bisect`` in
tests/test_bisect.py.)

Process-level behaviour is checked with subprocesses; the many error cases run ``kiln.cli.main`` in
this process (same code path, without paying torch's import time per case).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln.cli import InputSpec, dynamic_shapes_for, main, parse_input_spec

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
    (["compile", MLP, "--example-inputs", "f32[2,-3]"], "bad --example-inputs spec 'f32[2,-3]': bad dim '-3'"),
    (["compile", MLP, "--example-inputs", "f32[2,x]"], "torch.export failed for MLP"),  # x=4 but 32 features
    (["compile", MLP, "--example-inputs", "float99[2]"], "unknown dtype 'float99'"),
    (["compile", "{tiny}:broken"], "the factory raised RuntimeError: cannot build this one"),
    (["compile", "{tiny}:just_a_model"], "--example-inputs"),
    (["compile", MLP], "Missing option '-o'"),
    (["run", "{tmp}/no-artifact"], "no such artifact directory"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["compile", MLP, "--backend", "gpu9000"], "unknown target 'gpu9000'"),
    (["compile", MLP, "--example-inputs", "f32[s0=1,32]"], "symbolic dim 's0' needs an example size >= 2"),
    (["compile", MLP, "--example-inputs", "f32[b=4,32];f32[b=5,2]"], "has example size 5 here but 4"),
    (["compile", MLP, "--quantize", "int3"], "must be one of int8, int8-dynamic, int4-weight, mixed"),
    (["compile", MLP, "--prune", "0.5"], "'prune' is not implemented yet"),
    (["compile", MLP, "--prune", "1.5"], "target sparsity in [0, 1)"),
    (["compile", MLP, "--tune-trials", "8"], "'tune_trials' applies to the tvm target, not 'reference'"),
    (["compile", MLP, "--plugin", "nope/plugin.py"], "--plugin nope/plugin.py: no such file"),
    (["compile", MLP, "--plugin", "no_such_plugin_mod"], "cannot import module 'no_such_plugin_mod'"),
    (["compile", "{tmp}/missing.pt2"], "missing.pt2: no such file"),
    (["compile", "{tmp}/not_a_program.pt2"], "cannot load a saved ExportedProgram"),
    (["compile", "{tmp}/not_a_program.pt2", "--size", "bench"], "takes no --size"),
    (["bench", "examples/models/mlp.py:make_modle"], "has no attribute 'make_modle'"),
    (["bench", MLP, "--target", "gpu9000"], "unknown target 'gpu9000'"),
    (["bench", MLP, "--example-inputs", "f32[]]"], "bad --example-inputs spec"),
])
def test_user_errors_exit_2_with_one_line(args, message, tiny_models, tmp_path, capsys):
    (tmp_path / "not_a_program.pt2").write_bytes(b"not a zip archive")
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

    assert parse_input_spec("f32[2,8];i64[2, 16]") == [InputSpec(torch.float32, (2, 8), (None, None)),
                                                       InputSpec(torch.int64, (2, 16), (None, None))]
    assert parse_input_spec("float16[]") == [InputSpec(torch.float16, (), ())]
    # named dims are symbolic; one name is one dim everywhere; example size after '=' (default 4)
    specs = parse_input_spec("f32[batch,3];i64[batch, seq=7];f32[seq]")
    assert [(s.shape, s.dims) for s in specs] == [((4, 3), ("batch", None)), ((4, 7), ("batch", "seq")),
                                                  ((7,), ("seq",))]
    shapes = dynamic_shapes_for(specs)
    assert shapes[0][0] is shapes[1][0] and shapes[1][1] is shapes[2][0] and set(shapes[0]) == {0}
    assert dynamic_shapes_for(parse_input_spec("f32[2,8]")) is None


def test_symbolic_batch_compiles_once_and_runs_other_sizes(tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import kiln

    monkeypatch.chdir(REPO)
    out = tmp_path / "dyn"
    assert main(["compile", MLP, "--example-inputs", "f32[batch=6,32]", "-o", str(out)]) == 0
    loaded = kiln.load(out)
    (batch,) = {str(d) for d in loaded.graph.inputs[0].type.shape if not isinstance(d, int)}
    assert loaded.manifest["input_types"] == [f"f32[{batch}, 32]"]
    save_file({"input_0": torch.randn(9, 32)}, tmp_path / "nine.safetensors")
    capsys.readouterr()
    assert main(["run", str(out), "--inputs", str(tmp_path / "nine.safetensors"), "--check"]) == 0
    assert "output[0]: f32[9, 10]" in capsys.readouterr().out


def test_saved_exported_program_and_manifest_contents(tmp_path, capsys, monkeypatch):
    import json

    import torch

    import kiln
    from examples.models import mlp

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)
    model, inputs = mlp.make_mlp(size="small")
    program = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, inputs, strict=False), program)
    out = tmp_path / "from-pt2"
    assert main(["compile", str(program), "-O", "O1", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]) == 0
    assert os.environ["KILN_CACHE_DIR"] == str((tmp_path / "cache").resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kiln_version"] == kiln.__version__ and manifest["torch_version"] == torch.__version__
    assert manifest["target"] == "reference" and manifest["pipeline"] == "O1"
    assert manifest["options"] == {"target": "reference", "pipeline": "O1", "verify": False, "check": False,
                                   "backend_options": {}, "quantize": None}
    assert manifest["model_ref"] == str(program.resolve()) and manifest["model_args"] == {}
    assert set(manifest["files"]) == {"graph.kir", "weights.safetensors", "inputs.safetensors"}
    capsys.readouterr()
    assert main(["run", str(out), "--check"]) == 0  # rebuilds the eager model from the .pt2
    assert "check: matches eager PyTorch" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(kiln.load(out)(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_compile_quantize_int8_then_run_check_against_the_quantized_reference(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["compile", "examples/models/resnet.py:make_model", "--quantize", "int8", "-o", str(out)]) == 0
    assert "quantize" in capsys.readouterr().out  # the pass table lists the quantize pass
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["quantize"] == "int8"
    assert "kiln.qconv2d" in (out / "graph.kir").read_text()  # saved before lowering: exact semantics
    assert main(["run", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "check: matches the int8 quantized reference graph" in text
    assert "quantization error vs eager float" in text
