import pytest
from nsutil import NetNS


@pytest.fixture
def netns():
    """A fresh network namespace with loopback up, deleted after the test."""
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()
