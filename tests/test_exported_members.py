"""What nflogd_client says is public is what it exposes, and every module's ``__all__`` resolves."""

import importlib
import importlib.util
import pkgutil
import subprocess
import sys
import types

import nflogd_client
import pytest

pytestmark = pytest.mark.timeout(60)

MODULES = sorted(m.name for m in pkgutil.iter_modules(nflogd_client.__path__))


def test_all_equals_the_public_names():
    namespace = vars(nflogd_client)
    public = {
        name
        for name in dir(nflogd_client)  # includes the lazily loaded names
        if not name.startswith("_") and not isinstance(namespace.get(name), types.ModuleType)
    }
    assert sorted(nflogd_client.__all__) == sorted(public)
    assert len(set(nflogd_client.__all__)) == len(nflogd_client.__all__)


@pytest.mark.parametrize("name", nflogd_client.__all__)
def test_package_names_resolve(name):
    module = getattr(nflogd_client, "_LAZY", {}).get(name)
    if module and importlib.util.find_spec(f"nflogd_client.{module}") is None:
        pytest.skip(f"nflogd_client.{module} is not written yet")
    assert getattr(nflogd_client, name) is not None


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        nflogd_client.nope  # noqa: B018


def test_modules_are_known():
    assert {"wire", "subscriber"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_all_resolves(module):
    mod = importlib.import_module(f"nflogd_client.{module}")
    assert hasattr(mod, "__all__"), f"nflogd_client.{module} has no __all__"
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"nflogd_client.{module}.__all__ names what it lacks: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__), f"nflogd_client.{module}.__all__ repeats a name"


@pytest.mark.parametrize("statement", ["import nflogd_client", "import nflogd_client.subscriber"])
def test_importing_the_client_does_not_import_scapy(statement):
    code = f"{statement}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'scapy'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
