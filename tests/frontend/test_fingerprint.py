"""Model fingerprints (the compile cache's key): equal for the same computation, different whenever what
the forward computes could differ, and refused (None, with a reason) where it cannot be told."""

from __future__ import annotations

import torch
import torch.nn as nn

from examples.models import REGISTRY
from kiln.frontend.fingerprint import model_fingerprint

OFFSET = torch.tensor(1.5)  # a 0-dim CPU tensor mixes with meta tensors; a wider one cannot
TABLE = torch.tensor([1.0, 2.0, 3.0, 4.0])


class Scaled(nn.Module):
    def __init__(self, scale: float = 2.0, relu: bool = True):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale, self.relu = scale, relu

    def forward(self, x):
        y = self.lin(x) * self.scale
        return torch.relu(y) if self.relu else y


class GlobalConstant(nn.Module):
    def forward(self, x):
        return x + OFFSET


class GlobalTable(nn.Module):
    def forward(self, x):
        return x + TABLE


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


class Unrolled(nn.Module):
    """The same elementwise calls many times (the recorder's memo), then a layout-dependent branch."""

    def forward(self, x):
        for _ in range(20):
            x = torch.sigmoid(x) * x + 1.0
        return x.sum() if x.is_contiguous() else x.mean()


def key(model, *inputs):
    torch.manual_seed(0)
    return model_fingerprint(model, inputs).key


def make_scaled(seed=0, **kw):
    torch.manual_seed(seed)
    return Scaled(**kw).eval()


def test_same_model_same_key_and_zoo_models_fingerprint():
    x = torch.randn(2, 4)
    assert key(make_scaled(), x) == key(make_scaled(), x) is not None
    for name in ("mlp", "transformer", "rnn"):
        model, inputs = REGISTRY[name]()
        fp = model_fingerprint(model, inputs)
        assert fp.key is not None, fp.reason
        assert fp.calls > 0
        again, inputs2 = REGISTRY[name]()
        assert model_fingerprint(again, inputs2).key == fp.key


def test_weights_inputs_and_attributes_change_the_key():
    x = torch.randn(2, 4)
    base = key(make_scaled(), x)
    assert key(make_scaled(seed=1), x) != base  # other weights
    edited = make_scaled()
    with torch.no_grad():
        edited.lin.weight[0, 0] += 1e-3  # one element, in place
    assert key(edited, x) != base
    assert key(make_scaled(), torch.randn(3, 4)) != base  # input shape
    assert key(make_scaled(), x.double()) != key(make_scaled().double(), x.double()) != base  # dtype
    assert key(make_scaled(), x + 1) != base  # input values (quantization calibrates on them)
    assert key(make_scaled(scale=3.0), x) != base  # a Python attribute the forward reads
    assert key(make_scaled(relu=False), x) != base  # another code path
    assert key(make_scaled().train(), x) != base  # the training flag


def test_global_tensor_constants_are_keyed_by_value():
    x = torch.randn(2, 4)
    before = key(GlobalConstant(), x)
    assert before is not None
    OFFSET.add_(1)
    try:
        assert key(GlobalConstant(), x) != before
    finally:
        OFFSET.sub_(1)
    assert key(GlobalConstant(), x) == before
    fp = model_fingerprint(GlobalTable(), (x,))  # refused, not guessed: the forward cannot run on meta
    assert fp.key is None and "meta" in fp.reason


def test_layouts_are_part_of_the_key_and_the_memo_keeps_them():
    x = torch.randn(2, 3, 4, 5)
    contiguous = model_fingerprint(Unrolled(), (x,))
    channels_last = model_fingerprint(Unrolled(), (x.to(memory_format=torch.channels_last),))
    assert contiguous.key is not None and channels_last.key is not None
    assert contiguous.key != channels_last.key
    assert contiguous.calls >= 60


def test_refusals_name_their_reason():
    x = torch.randn(2, 4)
    fp = model_fingerprint(DataDependent(), (x,))
    assert fp.key is None and "meta" in fp.reason
    hooked = make_scaled()
    hooked.lin.register_forward_hook(lambda m, i, o: o * 2)
    fp = model_fingerprint(hooked, (x,))
    assert fp.key is None and "hook" in fp.reason


def test_output_container_types_are_keyed():
    import collections

    A = collections.namedtuple("A", "y")
    B = collections.namedtuple("B", "y")

    class ReturnsA(nn.Module):
        def forward(self, x):
            return A(x + 1)

    class ReturnsB(nn.Module):
        def forward(self, x):
            return B(x + 1)

    ReturnsB.__qualname__ = ReturnsA.__qualname__  # same class name, same calls: only the container differs
    x = torch.randn(2)
    assert key(ReturnsA(), x) != key(ReturnsB(), x)


def test_a_forward_that_changes_module_state_is_refused_and_restored():
    class LazyTable(nn.Module):
        def forward(self, x):
            if not hasattr(self, "table"):  # a lazily built cache: the meta run would leave a meta tensor here
                self.table = torch.arange(4.0)
            return x + self.table

    model = LazyTable()
    fp = model_fingerprint(model, (torch.randn(2, 4),))
    assert fp.key is None and "module state" in fp.reason
    assert not hasattr(model, "table")
    assert model(torch.zeros(1, 4)).tolist() == [[0.0, 1.0, 2.0, 3.0]]  # a real tensor, not a meta one


def test_recorder_puts_constructors_on_meta_and_forgets_metadata_changed_in_place():
    from kiln.frontend.fingerprint import _Recorder

    x = torch.empty(3, device="meta")
    recorder = _Recorder({id(x): "in:0"})
    with torch.no_grad(), recorder:
        made = torch.zeros(2)  # no device given: the meta device, as under torch.device("meta")
        before = x + 1  # memoized by x's metadata
        x.unsqueeze_(0)  # in place: x is now [1, 3]
        after = x + 1  # must not reuse the [3] result
        out = torch.empty(0)
        out + 1  # memoized by out's [0] metadata
        torch.add(after, 1, out=out)  # resizes ``out`` to [1, 3]
        resized = out + 1
    assert made.device.type == "meta"
    assert tuple(before.shape) == (3,) and tuple(after.shape) == (1, 3) and tuple(resized.shape) == (1, 3)
