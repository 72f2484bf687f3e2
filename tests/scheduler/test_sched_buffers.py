"""Buffers, the live-bytes lower bound and the plan checker."""

from __future__ import annotations

import pytest

from kiln.errors import KilnError
from kiln.scheduler.buffers import ArenaPlan, Buffer, check_plan, live_bytes_lower_bound


def test_lower_bound_is_peak_of_live_bytes():
    bufs = [Buffer("a", 10, 0, 2), Buffer("b", 5, 1, 1), Buffer("c", 7, 3, 4), Buffer("d", 1, 2, 3)]
    # step 0: a=10; step 1: a+b=15; step 2: a+d=11; step 3: c+d=8; step 4: c=7
    assert live_bytes_lower_bound(bufs) == 15
    assert live_bytes_lower_bound([]) == 0


def test_conflicts_are_inclusive():
    assert Buffer("a", 1, 0, 2).conflicts(Buffer("b", 1, 2, 3))
    assert not Buffer("a", 1, 0, 1).conflicts(Buffer("b", 1, 2, 3))
    assert not Buffer("a", 0, 0, 5).conflicts(Buffer("b", 1, 2, 3))  # zero-size needs no memory


def test_duplicate_names_are_rejected():
    bufs = [Buffer("a", 8, 0, 1), Buffer("a", 8, 3, 4)]
    with pytest.raises(KilnError, match="unique"):
        check_plan(bufs, ArenaPlan({"a": 0}, 8, "hand"))


def test_check_plan_accepts_disjoint_and_rejects_overlap():
    bufs = [Buffer("a", 8, 0, 1), Buffer("b", 8, 1, 2), Buffer("c", 8, 2, 3)]
    check_plan(bufs, ArenaPlan({"a": 0, "b": 8, "c": 0}, 16, "hand"))  # a and c never live together
    with pytest.raises(KilnError, match="a and b are live together"):
        check_plan(bufs, ArenaPlan({"a": 0, "b": 4, "c": 0}, 16, "hand"))
    with pytest.raises(KilnError, match="outside the arena"):
        check_plan(bufs, ArenaPlan({"a": 0, "b": 12, "c": 0}, 16, "hand"))
    with pytest.raises(KilnError, match="no offset"):
        check_plan(bufs, ArenaPlan({"a": 0}, 16, "hand"))


def test_bad_buffer_is_rejected():
    with pytest.raises(KilnError):
        Buffer("x", 4, 3, 2)
