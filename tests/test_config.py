"""nflogd.config: the shipped file, defaults, every error message, and no exception but ConfigError."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from nflogd_client import curve

from nflogd import config, config_publish, config_relay
from nflogd.config import Config, GroupConfig
from nflogd.config_publish import MetricsConfig, PublishConfig
from nflogd.errors import ConfigError, NflogdError

ETC = Path(__file__).resolve().parent.parent / "etc" / "nflogd.yaml"
NO_SUCH_USER = "nflogd-test-no-such-user"


def test_public_names():
    """One module per file's schema: the daemon's, the sections both have, the relay's."""
    assert sorted(config.__all__) == ["Config", "GroupConfig", "load", "parse"]
    assert {"CurveConfig", "MetricsConfig", "PublishConfig"} <= set(config_publish.__all__)
    assert sorted(config_relay.__all__) == sorted(
        ["RelayConfig", "UpstreamConfig", "load_relay", "parse_relay", "JetStreamConfig"]
    )


# --- valid configurations ------------------------------------------------------------------------


def test_shipped_config_loads():
    cfg = config.load(ETC)
    assert cfg == Config(
        node=socket.gethostname(),
        groups=(GroupConfig(0), GroupConfig(5, copy_range=65535, queue_threshold=1024, flush_ms=10)),
        publish=PublishConfig(bind=("ipc:///run/nflogd/feed.sock",), hwm=100000),
        metrics=MetricsConfig(host="127.0.0.1", port=9477),
        user=None,
    )


def test_shipped_config_parses_from_text_with_its_name():
    assert config.parse(ETC.read_text(), source=str(ETC)) == config.load(ETC)


def test_minimal_config_gets_every_default():
    cfg = config.parse("groups: [0]")
    assert cfg.node == socket.gethostname()
    assert cfg.groups == (GroupConfig(0),)
    g = cfg.groups[0]
    assert (g.group, g.copy_range, g.queue_threshold, g.flush_ms, g.rcvbuf) == (0, 65535, 1024, 10, 8388608)
    assert cfg.publish.bind == ("ipc:///run/nflogd/feed.sock",)
    assert cfg.publish.hwm == 100000
    assert cfg.metrics == MetricsConfig("127.0.0.1", 9477)
    assert cfg.user is None


def test_bare_and_mapping_groups_keep_their_order():
    cfg = config.parse(
        """
        groups:
          - 7
          - group: 5
            copy_range: 0
            queue_threshold: 1
            flush_ms: 60000
            rcvbuf: 4096
          - {group: 65535, copy_range: 128}
        """
    )
    assert cfg.groups == (
        GroupConfig(7),
        GroupConfig(5, copy_range=0, queue_threshold=1, flush_ms=60000, rcvbuf=4096),
        GroupConfig(65535, copy_range=128),
    )
    assert isinstance(cfg.groups, tuple)


def test_full_config():
    cfg = config.parse(
        """
        node: router1
        groups: [1]
        publish:
          bind: ["ipc:///run/nflogd/feed.sock", "tcp://127.0.0.1:5555", "tcp://[::1]:5556",
                 "tcp://*:5557", "tcp://feed.example.net:5558"]
          hwm: 10000000
          insecure: true
        metrics: {listen: "[::]:9100"}
        user: root
        """
    )
    assert cfg.node == "router1"
    assert cfg.publish == PublishConfig(
        bind=(
            "ipc:///run/nflogd/feed.sock",
            "tcp://127.0.0.1:5555",
            "tcp://[::1]:5556",
            "tcp://*:5557",
            "tcp://feed.example.net:5558",
        ),
        hwm=10000000,
        insecure=True,
    )
    assert cfg.metrics == MetricsConfig(host="::", port=9100)
    assert cfg.user == "root"


def test_bind_may_be_one_string():
    cfg = config.parse("groups: [0]\npublish: {bind: 'tcp://0.0.0.0:5555', insecure: true}")
    assert cfg.publish.bind == ("tcp://0.0.0.0:5555",)


def test_ipc_path_of_107_bytes_fits():
    path = "/" + "a" * 106
    assert config.parse(f"groups: [0]\npublish: {{bind: 'ipc://{path}'}}").publish.bind == (f"ipc://{path}",)


def test_metrics_listen_null_turns_metrics_off():
    assert config.parse("groups: [0]\nmetrics: {listen: null}").metrics is None


def test_metrics_host_name():
    assert config.parse("groups: [0]\nmetrics: {listen: 'localhost:1'}").metrics == MetricsConfig(
        "localhost", 1
    )


def test_empty_sections_take_defaults():
    cfg = config.parse("groups: [0]\npublish: {}\nmetrics: {}\nuser: null")
    assert cfg.publish == PublishConfig()
    assert cfg.metrics == MetricsConfig("127.0.0.1", 9477)
    assert cfg.user is None


def test_node_of_255_utf8_bytes():
    node = "é" * 127 + "x"  # 2 * 127 + 1 = 255 bytes
    assert config.parse(f"groups: [0]\nnode: {node}").node == node


# --- every error, on its message -----------------------------------------------------------------

BAD = [
    # top level
    ("", "<config>: top level must be a mapping of settings, got null"),
    ("- 0", "<config>: top level must be a mapping of settings, got a list"),
    ("just text", "<config>: top level must be a mapping of settings, got 'just text'"),
    (
        "groups: [0]\ngroup: [1]",
        "<config>: unknown key 'group'; expected one of groups, metrics, node, publish, user",
    ),
    ("node: r1", "groups: is required, a non-empty list of NFLOG group numbers"),
    # groups
    ("groups: []", "groups: must not be empty; list at least one NFLOG group"),
    ("groups: null", "groups: must be a list of NFLOG group numbers, got null"),
    ("groups: 0", "groups: must be a list of NFLOG group numbers, got 0"),
    ("groups: '0'", "groups: must be a list of NFLOG group numbers, got '0'"),
    ("groups: {group: 0}", "groups: must be a list of NFLOG group numbers, got a mapping"),
    ("groups: [0, 65536]", "groups[1]: must be an integer 0..65535, got 65536"),
    ("groups: [-1]", "groups[0]: must be an integer 0..65535, got -1"),
    (
        "groups: [true]",
        "groups[0]: must be a group number 0..65535 or a mapping with a 'group' key, got true",
    ),
    (
        "groups: ['5']",
        "groups[0]: must be a group number 0..65535 or a mapping with a 'group' key, got '5'",
    ),
    ("groups: [1.5]", "groups[0]: must be a group number 0..65535 or a mapping with a 'group' key, got 1.5"),
    (
        "groups: [[1]]",
        "groups[0]: must be a group number 0..65535 or a mapping with a 'group' key, got a list",
    ),
    (
        "groups: [0, 1, {flush: 3, group: 2}]",
        "groups[2]: unknown key 'flush'; "
        "expected one of conntrack, copy_range, flush_ms, group, netns, queue_threshold, rcvbuf",
    ),
    ("groups: [{copy_range: 1}]", "groups[0]: missing key 'group', the NFLOG group number 0..65535"),
    ("groups: [{group: 70000}]", "groups[0].group: must be an integer 0..65535, got 70000"),
    ("groups: [{group: false}]", "groups[0].group: must be an integer 0..65535, got false"),
    ("groups: [{group: null}]", "groups[0].group: must be an integer 0..65535, got null"),
    (
        "groups: [0, 1, {group: 2, copy_range: 70000}]",
        "groups[2].copy_range: must be an integer 0..65535, got 70000",
    ),
    ("groups: [{group: 2, copy_range: true}]", "groups[0].copy_range: must be an integer 0..65535, got true"),
    (
        "groups: [{group: 2, copy_range: '256'}]",
        "groups[0].copy_range: must be an integer 0..65535, got '256'",
    ),
    (
        "groups: [{group: 2, queue_threshold: 0}]",
        "groups[0].queue_threshold: must be an integer 1..65535, got 0",
    ),
    ("groups: [{group: 2, flush_ms: 0}]", "groups[0].flush_ms: must be an integer 1..60000, got 0"),
    ("groups: [{group: 2, flush_ms: 60001}]", "groups[0].flush_ms: must be an integer 1..60000, got 60001"),
    ("groups: [{group: 2, flush_ms: 1.0}]", "groups[0].flush_ms: must be an integer 1..60000, got 1.0"),
    ("groups: [{group: 2, rcvbuf: 4095}]", "groups[0].rcvbuf: must be an integer 4096..1073741824, got 4095"),
    (
        "groups: [{group: 2, rcvbuf: 1073741825}]",
        "groups[0].rcvbuf: must be an integer 4096..1073741824, got 1073741825",
    ),
    ("groups: [0, 5, 1, {group: 5}]", "groups[3]: group 5 is listed twice (also groups[1])"),
    ("groups: [0, 0]", "groups[1]: group 0 is listed twice (also groups[0])"),
    # node
    ("groups: [0]\nnode: ''", "node: must be a string of 1..255 UTF-8 bytes, got 0 bytes"),
    ("groups: [0]\nnode: " + "é" * 128, "node: must be a string of 1..255 UTF-8 bytes, got 256 bytes"),
    ("groups: [0]\nnode: 12", "node: must be a string of 1..255 UTF-8 bytes, got 12"),
    ("groups: [0]\nnode: null", "node: must be a string of 1..255 UTF-8 bytes, got null"),
    ("groups: [0]\nnode: [a]", "node: must be a string of 1..255 UTF-8 bytes, got a list"),
    ('groups: [0]\nnode: "\\ud800"', "node: not encodable as UTF-8: character '\\ud800' at offset 0"),
    # publish
    ("groups: [0]\npublish: null", "publish: must be a mapping, got null"),
    ("groups: [0]\npublish: [tcp://a:1]", "publish: must be a mapping, got a list"),
    (
        "groups: [0]\npublish: {hmw: 5}",
        "publish: unknown key 'hmw'; expected one of bind, curve, filter_linger_ms, handshake_timeout_ms, "
        "hwm, idle_timeout_ms, insecure, ipc_filter_groups, max_connections, max_connections_per_source, "
        "max_queued_bytes",
    ),
    (
        "groups: [0]\npublish: {max_connections_per_source: 0}",
        "publish.max_connections_per_source: must be an integer 1..100000, got 0",
    ),
    (
        "groups: [0]\npublish: {filter_linger_ms: 3600001}",
        "publish.filter_linger_ms: must be an integer 0..3600000, got 3600001",
    ),
    (
        "groups: [0]\npublish: {idle_timeout_ms: 500}",
        "publish.idle_timeout_ms: must be 0 (never) or at least 1000, got 500",
    ),
    (
        "groups: [0]\npublish: {idle_timeout_ms: -1}",
        "publish.idle_timeout_ms: must be an integer 0..86400000, got -1",
    ),
    (
        "groups: [0]\npublish: {max_queued_bytes: 1000}",
        "publish.max_queued_bytes: must be an integer 1048576..1099511627776, got 1000",
    ),
    ("groups: [0]\npublish: {hwm: 0}", "publish.hwm: must be an integer 1..10000000, got 0"),
    ("groups: [0]\npublish: {hwm: 10000001}", "publish.hwm: must be an integer 1..10000000, got 10000001"),
    ("groups: [0]\npublish: {hwm: true}", "publish.hwm: must be an integer 1..10000000, got true"),
    (
        "groups: [0]\npublish: {bind: []}",
        "publish.bind: must not be empty; give at least one of tcp://HOST:PORT or ipc:///absolute/path",
    ),
    (
        "groups: [0]\npublish: {bind: 5555}",
        "publish.bind: must be an endpoint string or a list of them, got 5555",
    ),
    (
        "groups: [0]\npublish: {bind: null}",
        "publish.bind: must be an endpoint string or a list of them, got null",
    ),
    (
        "groups: [0]\npublish: {bind: [ipc:///a, 5555]}",
        "publish.bind[1]: must be an endpoint string like tcp://HOST:PORT or ipc:///absolute/path, got 5555",
    ),
    (
        "groups: [0]\npublish: {bind: [ipc:///a, 127.0.0.1:5555]}",
        "publish.bind[1]: must be an endpoint like tcp://HOST:PORT or ipc:///absolute/path, "
        "got '127.0.0.1:5555'",
    ),
    (
        "groups: [0]\npublish: {bind: ['inproc://feed']}",
        "publish.bind[0]: unsupported transport 'inproc'; expected tcp://HOST:PORT or ipc:///absolute/path",
    ),
    (
        "groups: [0]\npublish: {bind: ['TCP://1.2.3.4:5']}",
        "publish.bind[0]: unsupported transport 'TCP'; expected tcp://HOST:PORT or ipc:///absolute/path",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://*:*']}",
        "publish.bind[0]: a wildcard port is not allowed; name a port 1..65535",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://127.0.0.1']}",
        "publish.bind[0]: missing ':PORT' in 'tcp://127.0.0.1'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://1.2.3.4:0']}",
        "publish.bind[0]: port must be an integer 1..65535, got 0",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://1.2.3.4:65536']}",
        "publish.bind[0]: port must be an integer 1..65535, got 65536",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://1.2.3.4:http']}",
        "publish.bind[0]: port must be an integer 1..65535, got 'http'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://:5555']}",
        "publish.bind[0]: missing host before ':PORT' (use '*' or 0.0.0.0 for all addresses)",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://999.1.1.1:5555']}",
        "publish.bind[0]: not a valid IPv4 address: '999.1.1.1'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://::1:5555']}",
        "publish.bind[0]: an IPv6 address needs brackets, like [::1]:5555; got 'tcp://::1:5555'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://[::g]:5555']}",
        "publish.bind[0]: not an IPv6 address in brackets: '::g'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://[::1:5555']}",
        "publish.bind[0]: missing ']' after the IPv6 address in 'tcp://[::1:5555'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://[::1]']}",
        "publish.bind[0]: missing ':PORT' after ']' in 'tcp://[::1]'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://bad host:5555']}",
        "publish.bind[0]: not an IP address or host name: 'bad host' "
        "(names are dot-separated labels of letters, digits, '-' and '_')",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://-lead.example:5555']}",
        "publish.bind[0]: not an IP address or host name: '-lead.example' "
        "(names are dot-separated labels of letters, digits, '-' and '_')",
    ),
    (
        "groups: [0]\npublish: {bind: ['ipc://run/feed.sock']}",
        "publish.bind[0]: ipc path must be absolute (ipc:///run/...), got 'ipc://run/feed.sock'",
    ),
    (
        "groups: [0]\npublish: {bind: ['ipc:///" + "a" * 107 + "']}",
        "publish.bind[0]: ipc path is 108 bytes, at most 107 fit in a Unix socket address",
    ),
    (
        'groups: [0]\npublish: {bind: ["ipc:///a\\0b"]}',
        "publish.bind[0]: ipc path must not contain a NUL character, got 'ipc:///a\\x00b'",
    ),
    (
        "groups: [0]\npublish: {bind: ['tcp://127.0.0.1:5555', 'ipc:///a', 'tcp://127.0.0.1:5555']}",
        "publish.bind[2]: 'tcp://127.0.0.1:5555' is listed twice (also publish.bind[0])",
    ),
    # metrics
    (
        "groups: [0]\nmetrics: null",
        "metrics: must be a mapping, got null (to turn metrics off, write 'listen: null' under it)",
    ),
    ("groups: [0]\nmetrics: {port: 9}", "metrics: unknown key 'port'; expected one of listen"),
    (
        "groups: [0]\nmetrics: {listen: 9477}",
        'metrics.listen: must be "host:port" or null to turn metrics off, got 9477',
    ),
    ("groups: [0]\nmetrics: {listen: 'localhost'}", "metrics.listen: missing ':PORT' in 'localhost'"),
    (
        "groups: [0]\nmetrics: {listen: '127.0.0.1:0'}",
        "metrics.listen: port must be an integer 1..65535, got 0",
    ),
    (
        "groups: [0]\nmetrics: {listen: '*:9477'}",
        "metrics.listen: '*' is not a host here; use 0.0.0.0 or [::] for all addresses",
    ),
    (
        "groups: [0]\nmetrics: {listen: ':9477'}",
        "metrics.listen: missing host before ':PORT' (use 0.0.0.0 for all addresses)",
    ),
    (
        "groups: [0]\nmetrics: {listen: '::1:9477'}",
        "metrics.listen: an IPv6 address needs brackets, like [::1]:9477; got '::1:9477'",
    ),
    # user
    ("groups: [0]\nuser: " + NO_SUCH_USER, f"user: no such user '{NO_SUCH_USER}'"),
    ("groups: [0]\nuser: 0", "user: must be a user name or null, got 0"),
    # YAML itself
    (
        "groups: [0\n",
        "<config>: invalid YAML at line 2 column 1: expected ',' or ']', but got '<stream end>'",
    ),
    (
        "groups: [0]\nnode: a: b",
        "<config>: invalid YAML at line 2 column 8: mapping values are not allowed here",
    ),
    (
        "groups: [0]\nnode: a\x00",
        "<config>: invalid YAML at line 2 column 8: "
        "unacceptable character #x0000: special characters are not allowed",
    ),
    (
        "groups: [0]\ngroups: [1]",
        "<config>: invalid YAML at line 2 column 1: duplicate key 'groups' (first at line 1)",
    ),
    (
        "groups: [{group: 1, group: 2}]",
        "<config>: invalid YAML at line 1 column 21: duplicate key 'group' (first at line 1)",
    ),
    (
        "groups: !!python/object:os.system [0]",
        "<config>: invalid YAML at line 1 column 9: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object:os.system'",
    ),
    (
        "groups: [0]\n---\ngroups: [1]",
        "<config>: invalid YAML at line 2 column 1: "
        "expected a single document in the stream, but found another document",
    ),
    ("node: 2020-13-45\ngroups: [0]", "<config>: invalid YAML: month must be in 1..12"),
    ("[" * 5000, "<config>: invalid YAML: nested too deeply"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] + " " + m[-30:] for _, m in BAD])
def test_bad_config_message(text, message):
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_config_error_is_the_shared_one():
    with pytest.raises(ConfigError) as info:
        config.parse("groups: []")
    assert isinstance(info.value, NflogdError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError) as info:
        config.parse("groups: [0")
    assert info.value.__suppress_context__  # "from None": no yaml traceback chained behind it


def test_merge_key_may_override():
    cfg = config.parse("groups: [&base {group: 1, flush_ms: 20}, {<<: *base, group: 2}]")
    assert cfg.groups == (GroupConfig(1, flush_ms=20), GroupConfig(2, flush_ms=20))


def test_source_names_the_text():
    with pytest.raises(ConfigError, match=r"^stdin: top level must be a mapping of settings, got 5$"):
        config.parse("5", source="stdin")


# --- files ---------------------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "nflogd.yaml"
    path.write_text("groups: [3]\nnode: n1\n")
    assert config.load(path) == config.load(str(path)) == config.parse("groups: [3]\nnode: n1\n")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read: [Errno 2] No such file or directory"


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: [Errno 22] not a regular file (a directory)"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"groups: [0]\nnode: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read: not UTF-8 (byte 0xe9 at offset 21)"


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("groups: [0]\npublish:\n  bind: [\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: invalid YAML at line 4 column 1: ")


def test_key_errors_name_the_key_not_the_file(tmp_path):
    path = tmp_path / "range.yaml"
    path.write_text("groups:\n  - group: 1\n    copy_range: 70000\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == "groups[0].copy_range: must be an integer 0..65535, got 70000"


# --- the dataclasses from Python -----------------------------------------------------------------


def test_conntrack_is_per_group_and_off_by_default():
    cfg = config.parse("groups: [{group: 1, conntrack: true}, {group: 2, conntrack: false}, 3]")
    assert [g.conntrack for g in cfg.groups] == [True, False, False]


@pytest.mark.parametrize("value, shown", [("yes please", "'yes please'"), ("1", "1"), ("null", "null")])
def test_conntrack_must_be_a_boolean(value, shown):
    with pytest.raises(ConfigError) as info:
        config.parse(f"groups: [0, {{group: 1, conntrack: {value}}}]")
    assert str(info.value) == f"groups[1].conntrack: must be true or false, got {shown}"


def test_netns_names_and_paths():
    cfg = config.parse(
        "groups: [{group: 1, netns: blue}, {group: 2, netns: /proc/1/ns/net}, {group: 3, netns: null}, 4]"
    )
    assert [g.netns for g in cfg.groups] == ["blue", "/proc/1/ns/net", None, None]
    # only the form is checked: a namespace comes and goes with its container
    assert config.parse("groups: [{group: 1, netns: no-such-ns.0}]").groups[0].netns == "no-such-ns.0"


NETNS_FORM = "must be a name under /run/netns or an absolute path like /proc/PID/ns/net"
NETNS_NAME = "(up to 255 letters, digits, '_', '-', '.'; or an absolute path)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("''", f"{NETNS_FORM}, got ''"),
        ("5", f"{NETNS_FORM}, got 5"),
        ("[a]", f"{NETNS_FORM}, got a list"),
        ("run/netns/a", "a path must be absolute (/run/netns/NAME, /proc/PID/ns/net), got 'run/netns/a'"),
        ("'a b'", f"not a namespace name: 'a b' {NETNS_NAME}"),
        ("..", f"not a namespace name: '..' {NETNS_NAME}"),
        ('"a\\0"', "must not contain a NUL character, got 'a\\x00'"),
        ("/" + "a" * 4095, "path is 4096 bytes, at most 4095"),
    ],
)
def test_netns_bad_form(value, message):
    with pytest.raises(ConfigError) as info:
        config.parse(f"groups: [{{group: 1, netns: {value}}}]")
    assert str(info.value) == f"groups[0].netns: {message}"


def test_group_number_once_across_namespaces():
    """The feed's topic and the metrics' label are the group number: one per number."""
    with pytest.raises(ConfigError) as info:
        config.parse("groups: [{group: 5, netns: a}, {group: 5, netns: b}]")
    assert str(info.value) == (
        "groups[1]: group 5 is listed twice (also groups[0]); "
        "a group number may be used once across all namespaces"
    )
    with pytest.raises(ConfigError) as info:
        config.parse("groups: [{group: 5, netns: a}, {group: 5, netns: a}]")
    assert str(info.value) == "groups[1]: group 5 is listed twice (also groups[0])"


def test_group_config_from_keywords():
    g = GroupConfig(group=3, copy_range=0, queue_threshold=1, flush_ms=60000, rcvbuf=1 << 30)
    assert (g.group, g.copy_range, g.queue_threshold, g.flush_ms, g.rcvbuf) == (3, 0, 1, 60000, 1 << 30)
    assert GroupConfig(3) == GroupConfig(
        group=3, copy_range=65535, queue_threshold=1024, flush_ms=10, rcvbuf=8388608
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group": 65536}, "group: must be an integer 0..65535, got 65536"),
        ({"group": True}, "group: must be an integer 0..65535, got true"),
        ({"group": "1"}, "group: must be an integer 0..65535, got '1'"),
        ({"group": 1, "copy_range": 70000}, "copy_range: must be an integer 0..65535, got 70000"),
        ({"group": 1, "queue_threshold": 0}, "queue_threshold: must be an integer 1..65535, got 0"),
        ({"group": 1, "flush_ms": 10.0}, "flush_ms: must be an integer 1..60000, got 10.0"),
        ({"group": 1, "rcvbuf": None}, "rcvbuf: must be an integer 4096..1073741824, got null"),
        (
            {"group": 1, "netns": "x/y"},
            "netns: a path must be absolute (/run/netns/NAME, /proc/PID/ns/net), got 'x/y'",
        ),
        (
            {"group": 1, "rcvbuf": 10**400},
            "rcvbuf: must be an integer 4096..1073741824, got a 1329-bit integer",
        ),
    ],
)
def test_group_config_validates(kwargs, message):
    with pytest.raises(ConfigError) as info:
        GroupConfig(**kwargs)
    assert str(info.value) == message


def test_publish_and_metrics_validate_from_python():
    with pytest.raises(ConfigError, match=r"^bind: must be a tuple of endpoint strings, got a list$"):
        PublishConfig(bind=["ipc:///a"])
    with pytest.raises(ConfigError, match=r"^bind\[0\]: ipc path must be absolute"):
        PublishConfig(bind=("ipc://a",))
    with pytest.raises(ConfigError, match=r"^hwm: must be an integer 1\.\.10000000, got 0$"):
        PublishConfig(hwm=0)
    with pytest.raises(ConfigError, match=r"^port: must be an integer 1\.\.65535, got 0$"):
        MetricsConfig("127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"^host: must be an IPv6 address without brackets, got '\[::1\]'$"):
        MetricsConfig("[::1]", 9477)
    assert MetricsConfig("::1", 9477).host == "::1"


def test_frozen():
    cfg = config.parse("groups: [0]")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.groups[0].copy_range = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.publish.hwm = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.metrics.port = 1  # type: ignore[misc,union-attr]
    assert isinstance(cfg.publish.bind, tuple)
    assert hash(cfg) == hash(config.parse("groups: [0]"))


# --- users ---------------------------------------------------------------------------------------


def test_user_root_exists():
    assert config.parse("groups: [0]\nuser: root").user == "root"


def test_user_that_does_not_exist():
    with pytest.raises(ConfigError) as info:
        config.parse(f"groups: [0]\nuser: {NO_SUCH_USER}")
    assert str(info.value) == f"user: no such user '{NO_SUCH_USER}'"


# --- nothing but Config or ConfigError ----------------------------------------------------------


def _parse_or_config_error(text: str) -> None:
    try:
        result = config.parse(text)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message
        assert ": " in message
    else:
        assert isinstance(result, Config)
        assert result.groups and all(isinstance(g, GroupConfig) for g in result.groups)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_is_config_or_config_error(text):
    _parse_or_config_error(text)


_KEYS = st.sampled_from(
    [
        "groups",
        "group",
        "node",
        "publish",
        "bind",
        "hwm",
        "metrics",
        "listen",
        "user",
        "copy_range",
        "flush_ms",
    ]
)
_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
_TREES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_TREES)
def test_any_structure_is_config_or_config_error(tree):
    _parse_or_config_error(yaml.safe_dump(tree))


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"groups": st.lists(st.integers(0, 65535) | st.fixed_dictionaries({"group": st.integers(0, 65535)}))},
        optional={"publish": st.dictionaries(_KEYS, _TREES, max_size=2), "metrics": _TREES, "node": _SCALARS},
    )
)
def test_near_valid_structure_is_config_or_config_error(tree):
    _parse_or_config_error(yaml.safe_dump(tree))


# --- the relay's config --------------------------------------------------------------------------

RELAY_ETC = ETC.parent / "nflogd-relay.yaml"
RELAY_DEFAULT_BIND = ("ipc:///run/nflogd-relay/feed.sock",)


@pytest.fixture
def curve_keys(tmp_path):
    """Key files as nflogd-keygen writes them: a daemon's, the relay's, and a clients directory."""
    import zmq.auth

    keys = tmp_path / "keys"
    clients = tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    made = {name: zmq.auth.create_certificates(keys, name) for name in ("router", "relay", "alice")}
    (clients / "alice.key").write_bytes(Path(made["alice"][0]).read_bytes())
    return {name: (str(pub), str(sec)) for name, (pub, sec) in made.items()} | {"clients": str(clients)}


def test_shipped_relay_config_loads():
    assert config_relay.load_relay(RELAY_ETC) == config_relay.RelayConfig(
        upstreams=(
            config_relay.UpstreamConfig("ipc:///run/nflogd/feed.sock"),
            config_relay.UpstreamConfig("tcp://router1:5555"),
        ),
        publish=PublishConfig(bind=RELAY_DEFAULT_BIND, hwm=100000),
        metrics=MetricsConfig("127.0.0.1", 9478),
    )


def test_relay_minimal_config_gets_every_default():
    cfg = config_relay.parse_relay("upstreams: [tcp://10.0.0.1:5555]")
    assert cfg.upstreams == (config_relay.UpstreamConfig("tcp://10.0.0.1:5555"),)
    assert not cfg.upstreams[0].curve
    assert cfg.publish == PublishConfig(bind=RELAY_DEFAULT_BIND)
    assert cfg.metrics == MetricsConfig("127.0.0.1", 9478)


def test_relay_publish_and_metrics_are_the_daemons_sections():
    cfg = config_relay.parse_relay(
        "upstreams: [ipc:///run/nflogd/feed.sock]\n"
        "publish: {bind: tcp://127.0.0.1:5556, hwm: 10}\n"
        "metrics: {listen: null}\n"
    )
    assert cfg.publish == PublishConfig(bind=("tcp://127.0.0.1:5556",), hwm=10)
    assert cfg.metrics is None


def test_relay_curve_keys_are_read_on_both_sides(curve_keys):
    router_pub, _ = curve_keys["router"]
    _, relay_secret = curve_keys["relay"]
    by_text = curve.public_key(router_pub).decode()
    relay_curve = {"secret_key_file": relay_secret, "authorized_keys_dir": curve_keys["clients"]}
    cfg = config_relay.parse_relay(
        yaml.safe_dump(
            {
                "upstreams": [
                    {"endpoint": "tcp://10.0.0.1:5555", "server_public_key": router_pub,
                     "client_secret_key_file": relay_secret},
                    {"endpoint": "tcp://10.0.0.2:5555", "server_public_key": by_text,
                     "client_secret_key_file": relay_secret},
                ],
                "publish": {"bind": "tcp://0.0.0.0:5556", "curve": relay_curve},
            }
        )
    )  # fmt: skip
    a, b = cfg.upstreams
    assert a.curve and a.server_key == b.server_key == curve.public_key(router_pub)
    assert (a.client_public_key, a.client_secret_key) == curve.keypair(relay_secret)
    assert "client_secret_key=" not in repr(a) and a.client_secret_key.decode() not in repr(cfg)
    assert cfg.publish.curve.public_key == a.client_public_key


def _relay_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_relay.parse_relay(text)
    message = str(info.value)
    assert "\n" not in message
    return message


RELAY_BAD = [
    ("groups: [1]\n", "<config>: unknown key 'groups'; expected one of "
     "jetstream, metrics, publish, upstreams"),
    ("publish: {}\n", "upstreams: is required, a non-empty list of nflogd endpoints to subscribe to"),
    ("upstreams: []\n", "upstreams: must not be empty; list at least one nflogd endpoint"),
    ("upstreams: tcp://a:1\n", "upstreams: must be a list of endpoints or mappings, got 'tcp://a:1'"),
    ("upstreams: [5]\n", "upstreams[0]: must be an endpoint string or a mapping with 'endpoint', got 5"),
    ("upstreams: ['udp://a:1']\n", "upstreams[0]: unsupported transport 'udp'"),
    ("upstreams: [tcp://a:1, {endpoint: tcp://a:1}]\n",
     "upstreams[1]: 'tcp://a:1' is listed twice (also upstreams[0])"),
    ("upstreams: [{server_public_key: x}]\n", "upstreams[0]: missing key 'endpoint', like tcp://router1:5555"),
    ("upstreams: [{endpoint: 'tcp://a'}]\n", "upstreams[0].endpoint: missing ':PORT'"),
    ("upstreams: [{endpoint: tcp://a:1, hwm: 3}]\n", "upstreams[0]: unknown key 'hwm'"),
    ("upstreams: [{endpoint: tcp://a:1, server_public_key: /k}]\n",
     "upstreams[0]: server_public_key needs client_secret_key_file"),
    ("upstreams: [{endpoint: tcp://a:1, client_secret_key_file: /k}]\n",
     "upstreams[0]: client_secret_key_file needs server_public_key"),
    ("upstreams: [{endpoint: tcp://a:1, server_public_key: /nonexistent.key, client_secret_key_file: /k}]\n",
     "upstreams[0].server_public_key: cannot read /nonexistent.key: [Errno 2]"),
    ("upstreams: [{endpoint: tcp://a:1, server_public_key: 7, client_secret_key_file: /k}]\n",
     "upstreams[0].server_public_key: must be a key file or 40 Z85 characters, got 7"),
    ("upstreams: [{endpoint: tcp://a:1, server_public_key: /k, client_secret_key_file: k}]\n",
     "upstreams[0].client_secret_key_file: must be an absolute path, got 'k'"),
    ("upstreams: [tcp://a:1]\npublish: {bind: 'tcp://0.0.0.0:5556'}\n",
     "publish.bind[0]: tcp://0.0.0.0:5556 is not a loopback address and publish.curve is not set"),
    ("upstreams: [tcp://a:1]\npublish: {bnd: x}\n", "publish: unknown key 'bnd'"),
    ("upstreams: [tcp://a:1]\nmetrics: {listen: 9478}\n", "metrics.listen: must be \"host:port\" or null"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), RELAY_BAD, ids=[m[:40] for _, m in RELAY_BAD])
def test_relay_errors_name_the_key(text, message):
    assert _relay_error(text).startswith(message)


def test_relay_key_errors_name_the_upstream_and_the_file(curve_keys):
    router_pub, router_secret = curve_keys["router"]
    _, relay_secret = curve_keys["relay"]

    def upstream(server, secret):
        return yaml.safe_dump({"upstreams": [{"endpoint": "tcp://a:1", "server_public_key": server,
                                              "client_secret_key_file": secret}]})  # fmt: skip

    assert _relay_error(upstream(router_pub, router_pub)).startswith(
        f"upstreams[0].client_secret_key_file: {router_pub}: no secret key in it"
    )
    assert _relay_error(upstream("x" * 39 + "\\", relay_secret)).startswith(
        "upstreams[0].server_public_key: cannot read"
    )
    assert (
        config_relay.parse_relay(upstream(router_secret, relay_secret)).upstreams[0].curve
    )  # the pair file will do


def test_upstream_config_from_keywords_validates(curve_keys):
    public, secret = curve.keypair(curve_keys["relay"][1])
    assert config_relay.UpstreamConfig("ipc:///run/f.sock", public, public, secret).curve
    with pytest.raises(ConfigError, match="give all three for CURVE or none, got server_key"):
        config_relay.UpstreamConfig("tcp://a:1", server_key=public)
    with pytest.raises(ConfigError, match="^endpoint: "):
        config_relay.UpstreamConfig("tcp://a")
    with pytest.raises(ConfigError, match="^server_key: "):
        config_relay.UpstreamConfig("tcp://a:1", b"x" * 39, public, secret)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"upstreams": st.lists(st.sampled_from(["tcp://a:1", "ipc:///x"]) | _TREES, max_size=3)},
        optional={"publish": st.dictionaries(_KEYS, _TREES, max_size=2), "metrics": _TREES},
    )
)
def test_near_valid_relay_structure_is_config_or_config_error(tree):
    try:
        result = config_relay.parse_relay(yaml.safe_dump(tree))
    except ConfigError as e:
        assert ": " in str(e) and "\n" not in str(e)
    else:
        assert isinstance(result, config_relay.RelayConfig) and result.upstreams
