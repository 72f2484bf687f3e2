"""`torch.compile(model, backend="kiln")` works after install with no `import kiln` (entry point)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_backend_registered_through_entry_point():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        x = torch.randn(4, 8)
        assert "kiln" not in sys.modules
        out = torch.compile(m, backend="kiln")(x)
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)
        import kiln
        reports = kiln.fallback_reports()
        assert reports and reports[0]["reason"] is None, reports
        print("OK", reports[0]["nodes"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
