"""The op registry covers PyTorch's core ATen opset: every core op resolves by its IR name, with its
schema, and names round-trip between torch overloads and IR spellings."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir.ops import aten, get_op, ir_name, op_for_target


def _core_aten_overloads():
    out = []
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            continue
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for ov_name in packet.overloads():
            ov = getattr(packet, ov_name)
            if torch.Tag.core in ov.tags:
                out.append(ov)
    return out


def test_every_core_aten_op_is_in_the_registry():
    overloads = _core_aten_overloads()
    assert len(overloads) > 150  # the core opset is ~180 ops; the check is meaningless if it is empty
    for ov in overloads:
        od = get_op(ir_name(ov))
        assert od.target is ov and od.core and od.schema is not None
        assert op_for_target(ov) is od


def test_packets_and_overloads():
    assert aten.add.Tensor is get_op("aten.add.Tensor")
    assert aten.addmm.default is get_op("aten.addmm")
    assert aten.add.Tensor.packet is aten.add
    assert get_op("aten.max.dim").multi_result and not aten.relu.default.multi_result
    assert aten.rand.default.nondeterministic and aten.add_.Tensor.side_effects
    assert not aten.relu.default.side_effects


def test_unknown_op_is_a_kiln_error():
    with pytest.raises(KilnError, match="unknown op 'aten.not_an_op'"):
        get_op("aten.not_an_op")
    with pytest.raises(KilnError, match="unknown op"):
        get_op("kiln.nope")


def test_default_overload_spellings_are_one_opdef():
    import torch

    from kiln.ir.ops import aten, get_op, op_for_target

    by_target = op_for_target(torch.ops.aten.hardswish.default)
    assert get_op("aten.hardswish.default") is by_target
    assert aten.hardswish.default is by_target and get_op("aten.hardswish") is by_target
