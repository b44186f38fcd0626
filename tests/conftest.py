import shutil

import pytest
import zmq
from feedutil import FakeFeed
from hypothesis import settings
from nsutil import NetNS

# The properties tested with hypothesis are about results, not time: no per-example deadline, so a
# machine busy with other work cannot turn a slow example into a failure.
settings.register_profile("nflogd", deadline=None)
settings.load_profile("nflogd")


def pytest_runtest_setup(item):
    """``@pytest.mark.needs("tcpdump")``: skipped where the program is not installed."""
    for mark in item.iter_markers("needs"):
        for program in mark.args:
            if shutil.which(program) is None:
                pytest.skip(f"{program} is not installed (make debs installs it)")


@pytest.fixture
def netns(request):
    """A fresh network namespace with loopback up, deleted after the test (root: kernel tests only)."""
    if request.node.get_closest_marker("kernel") is None:
        pytest.fail("a test that uses the netns fixture needs @pytest.mark.kernel")
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def feed(tmp_path):
    """A fake publisher on an ipc path under tmp_path (tests/feedutil.py), closed after the test."""
    f = FakeFeed(tmp_path / "feed.sock")
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def ctx():
    """A ZeroMQ context, destroyed after the test (closing any socket a failing test left open)."""
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)
