"""``KILN_LOGS`` switches (TORCH_LOGS syntax) and the progress helper that stays quiet off a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest

from kiln.errors import KilnInputError
from kiln.logs import AREAS, init_from_env, parse_logs, progress, set_logs, track


@pytest.fixture(autouse=True)
def reset_logs():
    set_logs("")
    yield
    set_logs("")


def test_parse_levels_plain_plus_minus():
    assert parse_logs("+passes, fusion,-frontend,") == {
        "passes": logging.DEBUG, "fusion": logging.INFO, "frontend": logging.ERROR}
    assert parse_logs("") == {}


@pytest.mark.parametrize("spec, bad", [("passes,nope", "'nope'"), ("+", "''"), ("++passes", "'+passes'")])
def test_unknown_area_is_a_clear_error(spec, bad):
    with pytest.raises(KilnInputError, match=f"unknown area {re.escape(bad)}.*known areas: .*passes"):
        parse_logs(spec)


def test_areas_map_to_kiln_loggers_and_messages_reach_stderr(capsys):
    set_logs("+passes,fusion,-frontend")
    assert logging.getLogger(AREAS["passes"]).level == logging.DEBUG
    assert logging.getLogger("kiln.passes.fusion").level == logging.INFO  # the child area wins
    logging.getLogger("kiln.passes.cse").debug("cse detail")            # below an area: inherits DEBUG
    logging.getLogger("kiln.passes.fusion.policy").debug("fusion detail")  # fusion is INFO: dropped
    logging.getLogger("kiln.passes.fusion.policy").info("fusion info")
    logging.getLogger("kiln.frontend.export").warning("frontend warning")  # -frontend: errors only
    logging.getLogger("kiln.frontend.export").error("frontend error")
    logging.getLogger("kiln.scheduler").info("scheduler info")  # not named: WARNING and above
    logging.getLogger("kiln.scheduler").warning("scheduler warning")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[kiln.passes.cse] DEBUG: cse detail", "[kiln.passes.fusion.policy] INFO: fusion info",
                   "[kiln.frontend.export] ERROR: frontend error", "[kiln.scheduler] WARNING: scheduler warning"]


def test_order_of_items_does_not_matter():
    set_logs("-fusion,+passes")
    assert logging.getLogger("kiln.passes.fusion").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("kiln.passes.cse").getEffectiveLevel() == logging.DEBUG


def test_reset_restores_propagation_and_levels():
    root = logging.getLogger("kiln")
    set_logs("+all")
    assert root.level == logging.DEBUG and not root.propagate
    assert sum(1 for h in root.handlers if getattr(h, "_kiln_logs_handler", False)) == 1
    set_logs("passes")  # re-applying keeps one handler
    assert sum(1 for h in root.handlers if getattr(h, "_kiln_logs_handler", False)) == 1
    assert root.level == logging.WARNING
    set_logs("")
    assert root.propagate and root.level == logging.NOTSET
    assert not [h for h in root.handlers if getattr(h, "_kiln_logs_handler", False)]
    assert logging.getLogger("kiln.passes").level == logging.NOTSET


def test_python_keywords_and_env(monkeypatch):
    set_logs(scheduler=logging.DEBUG)
    assert logging.getLogger("kiln.scheduler").level == logging.DEBUG
    with pytest.raises(KilnInputError, match="unknown log area 'nope'"):
        set_logs(nope=logging.DEBUG)
    monkeypatch.setenv("KILN_LOGS", "+bisect")
    assert init_from_env() == {"bisect": logging.DEBUG}
    monkeypatch.setenv("KILN_LOGS", "bogus")
    with pytest.raises(KilnInputError, match=r"^\$KILN_LOGS: bad KILN_LOGS item 'bogus'"):
        init_from_env()


def test_cli_rejects_bad_kiln_logs(monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.setenv("KILN_LOGS", "+nope")
    assert main(["run", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: error: $KILN_LOGS: bad KILN_LOGS item '+nope'")


def test_progress_is_silent_off_a_terminal(capsys):
    with progress("solving", total=3) as p:
        for _ in range(3):
            p.advance()
    assert not p.drawing and p.completed == 3
    assert list(track(range(4), "items")) == [0, 1, 2, 3]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_draws_when_enabled():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with progress("tuning kernels", total=2, enabled=True, console=console) as p:
        p.advance()
        p.update(completed=2, description="tuned kernels")
    assert p.drawing and p.completed == 2
    assert "tuned kernels" in buf.getvalue() and "2/2" in buf.getvalue()


def test_progress_env_switch(monkeypatch):
    from kiln.logs import progress_enabled

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv("KILN_PROGRESS", "0")
    assert not progress_enabled()
