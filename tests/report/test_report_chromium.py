"""``scripts/check_report.py``: a ``kiln explain`` report opens in headless Chromium with no console
error, no network request and a non-blank screenshot; broken pages are caught. Skipped (with the reason)
where Chromium is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_report.py"
sys.path.insert(0, str(SCRIPT.parent))

from check_report import find_chromium  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium or on PATH "
                                                         "(apt-get install -y chromium)")


def _check(html: Path) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(html)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_explain_report_renders_cleanly(tmp_path):
    from kiln.frontend.export import from_export
    from kiln.report import explain, render_html

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    inputs = (torch.randn(2, 8),)
    html = tmp_path / "report.html"
    html.write_text(render_html(explain(from_export(model, inputs), inputs, measure=False)))
    rc, result = _check(html)
    assert rc == 0 and result["ok"], result["problems"]
    assert result["svgs"] == 4 and result["sections"][0] == "summary"
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["screenshot_size"][0] == 1400


@pytest.mark.parametrize("body, problem", [
    ("<svg></svg><script>document.body.dataset.ready='1'; undefinedFunction();</script>", "uncaught exception"),
    ("<svg></svg><script>console.error('boom'); document.body.dataset.ready='1';</script>", "console.error: boom"),
    ('<svg></svg><img src="http://127.0.0.1:9/x.png"><script>document.body.dataset.ready="1"</script>',
     "network request"),
    ("<p>no svg, no script</p>", "did not run"),
    ("<svg></svg><script>document.body.dataset.ready='1'</script>", "the screenshot is blank"),
])
def test_broken_pages_are_caught(tmp_path, body, problem):
    html = tmp_path / "bad.html"
    html.write_text(f"<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>{body}</body></html>")
    rc, result = _check(html)
    assert rc == 1 and not result["ok"]
    assert any(problem in p for p in result["problems"]), result["problems"]
