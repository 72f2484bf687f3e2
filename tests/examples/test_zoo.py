"""Tests for the example model zoo (``examples.models``), small sizes only.

For every registered model: the factory is deterministic, the model exports with
``torch.export`` (+ ``run_decompositions``) and matches eager, and one training
step through ``torch.compile(backend="aot_eager", fullgraph=True)`` matches an
eager training step (loss, gradients and mutated buffers such as BatchNorm
running statistics).
"""

from __future__ import annotations

import copy

import pytest
import torch

import examples.models
from examples.models import REGISTRY, get, rnn

NAMES = sorted(REGISTRY)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _loss(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(o.float().pow(2).mean() for o in _outputs(out))


def test_registry_contents() -> None:
    assert set(REGISTRY) == {"mlp", "resnet18", "mobilenetv2", "transformer", "gpt", "rnn", "mamba", "unet"}
    assert examples.models.REGISTRY is REGISTRY
    with pytest.raises(ValueError, match="available models"):
        get("no-such-model")


@pytest.mark.parametrize("name", NAMES)
def test_factory_is_deterministic(name: str) -> None:
    rng_state = torch.get_rng_state()
    model_a, inputs_a = REGISTRY[name](size="small", seed=0)
    model_b, inputs_b = get(name, size="small", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state), "factory must not disturb the global RNG"
    assert not model_a.training and not model_b.training
    assert isinstance(inputs_a, tuple) and all(isinstance(t, torch.Tensor) for t in inputs_a)

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert len(inputs_a) == len(inputs_b)
    for x_a, x_b in zip(inputs_a, inputs_b):
        assert x_a.dtype == x_b.dtype and torch.equal(x_a, x_b)
    with torch.no_grad():
        for out_a, out_b in zip(_outputs(model_a(*inputs_a)), _outputs(model_b(*inputs_b))):
            assert torch.equal(out_a, out_b)

    model_c, inputs_c = REGISTRY[name](size="small", seed=1)
    differs = any(not torch.equal(p, q) for p, q in zip(model_a.parameters(), model_c.parameters()))
    assert differs or any(not torch.equal(x, y) for x, y in zip(inputs_a, inputs_c)), "seed has no effect"


@pytest.mark.parametrize("name", NAMES)
def test_export_matches_eager(name: str) -> None:
    model, inputs = get(name)
    program = torch.export.export(model, inputs).run_decompositions()
    with torch.no_grad():
        expected = _outputs(model(*inputs))
        actual = _outputs(program.module()(*inputs))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_training_step_matches_eager(name: str) -> None:
    model, inputs = get(name)
    eager_model = copy.deepcopy(model).train()
    compiled_model = copy.deepcopy(model).train()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)

    eager_loss = _loss(eager_model(*inputs))
    eager_loss.backward()
    compiled_loss = _loss(compiled(*inputs))
    compiled_loss.backward()

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    eager_params = dict(eager_model.named_parameters())
    for pname, param in compiled_model.named_parameters():
        ref = eager_params[pname]
        assert ref.grad is not None and param.grad is not None, pname
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m, p=pname: f"{p}: {m}")
    eager_buffers = dict(eager_model.named_buffers())
    for bname, buf in compiled_model.named_buffers():
        torch.testing.assert_close(buf, eager_buffers[bname], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_size_raises(name: str) -> None:
    with pytest.raises(ValueError, match="small") as info:
        REGISTRY[name](size="huge")
    assert "bench" in str(info.value)


def test_hand_written_lstm_matches_nn_lstm() -> None:
    model, (x,) = get("rnn")
    ref = torch.nn.LSTM(rnn.SIZES["small"].input_size, rnn.SIZES["small"].hidden,
                        num_layers=len(model.layers), batch_first=True)
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            getattr(ref, f"weight_ih_l{k}").copy_(layer.ih.weight)
            getattr(ref, f"bias_ih_l{k}").copy_(layer.ih.bias)
            getattr(ref, f"weight_hh_l{k}").copy_(layer.hh.weight)
            getattr(ref, f"bias_hh_l{k}").copy_(layer.hh.bias)
        expected, _ = ref(x)
        torch.testing.assert_close(model.layers(x), expected, rtol=1e-5, atol=1e-6)
