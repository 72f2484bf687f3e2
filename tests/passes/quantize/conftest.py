"""Shared fixtures for the quantization tests: the digits CNN, trained once per session (seconds)."""

from __future__ import annotations

import pytest
import torch

from examples.models import digits
from kiln.frontend.export import from_export
from kiln.ir.clone import clone_graph

TEST_EPOCHS = 6  # ~98% test accuracy; enough to see what quantization costs


@pytest.fixture(scope="session")
def digits_cnn():
    model, data = digits.train_digits_cnn(epochs=TEST_EPOCHS)
    return model, data


@pytest.fixture(scope="session")
def digits_calib(digits_cnn):
    _, data = digits_cnn
    return [(data.x_train[i * 64:(i + 1) * 64],) for i in range(4)]


@pytest.fixture(scope="session")
def digits_exported(digits_cnn):
    """The trained CNN exported once with a dynamic batch dim; ``digits_graph`` hands out fresh copies."""
    model, _ = digits_cnn
    g = from_export(model, (torch.zeros(8, 1, 8, 8),),
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return g


@pytest.fixture
def digits_graph(digits_exported):
    return clone_graph(digits_exported)
