import pytest


@pytest.fixture(autouse=True)
def _private_kiln_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's kiln caches (kernels, tuning records, compiled models)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
