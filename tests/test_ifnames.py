"""nflogd.ifnames.LinkTable against the real kernel: a namespace's interface names, kept
current from RTM_NEWLINK/RTM_DELLINK without polling."""

import select

import pytest

from nflogd.ifnames import LinkTable

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]


def changed(table: LinkTable, want, timeout: float = 2.0) -> bool:
    """Wait for notifications (the socket readable: no polling) until ``want(names)``."""
    while not want(table.names):
        if not select.select([table], [], [], timeout)[0]:
            return False
        table.update()
    return True


def test_names_follow_adds_renames_and_deletes(netns):
    table = LinkTable(netns.name)
    try:
        assert table.names[1] == "lo"
        netns.run("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
        assert changed(table, lambda n: {"va", "vb"} <= set(n.values()))
        index = next(i for i, name in table.names.items() if name == "va")
        netns.run("ip", "link", "set", "va", "name", "uplink0")
        assert changed(table, lambda n: n.get(index) == "uplink0")
        netns.run("ip", "link", "del", "uplink0")  # takes its peer with it
        assert changed(table, lambda n: index not in n and "vb" not in n.values())
        assert table.names == {1: "lo"} and table.resyncs == 0
    finally:
        table.close()


def test_the_namespace_is_the_tables(netns):
    """A table of another namespace holds that namespace's interfaces, not this one's."""
    netns.run("ip", "link", "add", "only-here", "type", "veth", "peer", "name", "peer-here")
    table = LinkTable(netns.name)
    own = LinkTable(None)
    try:
        assert "only-here" in table.names.values()
        assert "only-here" not in own.names.values()
    finally:
        table.close()
        own.close()
