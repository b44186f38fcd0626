"""Every shell and Python block of README.md and docs/*.md runs here as pasted, or is marked
``<!-- excerpt -->`` (or ``<!-- excerpt: why -->``) on the line before its fence (a synopsis,
a step that needs systemd or another machine).

How an unmarked block runs, by what it is:

- firewall rules (``sh``, every command ``nft``, ``iptables`` or ``ip6tables``): the whole
  block in a fresh network namespace, each command succeeding;
- the test vectors' ``wire.encode(...)`` calls (``python`` in docs/wire-format.md): executed
  with ``wire`` and ``Packet`` imported, as the document says (tests/test_wire.py checks
  their bytes);
- every other block of README.md and docs/filters.md: in a lab standing in for a router, a
  network namespace with the real daemon (groups 5 and 7, ``ipc:///run/nflogd/feed.sock`` and ``tcp://127.0.0.1:5555``),
  rules logging steady UDP traffic to groups 0, 1, 5 and 7, and a mount namespace where
  ``/run`` is empty and ``/etc`` is a writable overlay, so that the block's paths exist
  without touching the machine's. A block passes when it exits 0, or is still running
  after ``LAB_WAIT`` seconds (a loop reading forever) with no traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from daemonutil import REPO, NflogdProcess, nflogd_command, wait_until
from nflogd_client import Subscriber, wire
from nflogd_client.wire import Packet
from nsutil import NetNS, SteadyTraffic
from test_relay import Lab, router_address

pytestmark = pytest.mark.timeout(120)

README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXCERPT = "<!-- excerpt -->"
#: Fence languages that hold commands or code: each such block is run or marked.
CODE = {"sh", "bash", "shell", "console", "python", "py", "pycon"}
FIREWALL = ("nft", "iptables", "ip6tables")
LAB_WAIT = 6.0
#: The documents whose blocks run in the lab.
LAB_DOCS = ("README.md", "filters.md")
LAB_PORT = 9999


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    excerpt: bool

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def commands(self) -> list[str]:
        return [c for c in (line.strip() for line in self.code.splitlines()) if c and not c.startswith("#")]

    @property
    def kind(self) -> str | None:
        if self.lang == "sh" and self.commands and all(c.split()[0] in FIREWALL for c in self.commands):
            return "firewall"
        if self.path.name == "wire-format.md" and self.lang == "python":
            return "vector"
        if self.path.name in LAB_DOCS and self.lang in ("sh", "python"):
            return "lab"
        return None


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = re.match(r"^( *)```(\S*)\s*$", lines[i])  # also indented, in a list item
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), None)
        assert end is not None, f"{path}:{i + 1}: a fence that never closes"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        marked = before == EXCERPT or (before.startswith("<!-- excerpt: ") and before.endswith(" -->"))
        found.append(Block(path, i + 1, m.group(2), code, marked))
        i = end + 1
    return found


BLOCKS = [b for p in DOCS for b in fenced_blocks(p)]
TO_RUN = [b for b in BLOCKS if b.lang in CODE and not b.excerpt]


def of_kind(kind: str) -> list:
    return [pytest.param(b, id=str(b)) for b in TO_RUN if b.kind == kind]


def test_every_code_block_is_run_or_marked_an_excerpt():
    assert len(BLOCKS) > 30  # the parser sees the documents' blocks
    orphans = [f"{b} ({b.lang})" for b in TO_RUN if b.kind is None]
    assert not orphans, f"neither run by {Path(__file__).name} nor marked {EXCERPT}: {orphans}"
    assert of_kind("firewall") and of_kind("vector") and of_kind("lab")


def test_starts_with_the_two_commands():
    first = [line.strip() for line in README.splitlines() if line.startswith("    make ")][:2]
    assert [line.split("#")[0].strip() for line in first] == ["make run", "make test"]


# -- firewall rules and vectors ----------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("block", of_kind("firewall"))
def test_firewall_block(block, netns):
    res = netns.run("sh", "-e", "-c", block.code, check=False)
    assert res.returncode == 0 and not res.stderr, f"{block}: {res.stderr}"


@pytest.mark.parametrize("block", of_kind("vector"))
def test_vector_block(block):
    namespace = {"wire": wire, "Packet": Packet}
    exec(compile(block.code, str(block), "exec"), namespace)
    frames = namespace["frames"]
    batch = wire.decode(frames)
    assert len(batch.packets) == wire.HEADER.unpack_from(frames[1])[4]  # the header's count (0: a mark)


@pytest.mark.kernel
def test_the_readme_rules_do_not_log_the_feed(tmp_path):
    """Pasted on a router whose feed a reader on another host reads over tcp, the README's
    catch-all rule must not log that connection: the reader's ACKs would feed it itself."""
    (nft,) = [b for b in TO_RUN if b.kind == "firewall" and b.path.name == "README.md" and "nft " in b.code]
    lab = Lab(1)
    try:
        router, reader = lab.routers[0], lab.collector
        router.run("sh", "-e", "-c", nft.code)
        endpoint = f"tcp://{router_address(1)}:5555"
        publish = {"bind": [endpoint], "insecure": True}
        with NflogdProcess(router, tmp_path / "d", groups=[0, 5], extra={"publish": publish}):
            with reader.entered():
                ctx = zmq.Context()
                sub = Subscriber(endpoint, groups=0, context=ctx)
            try:

                def connected() -> bool:
                    sub.recv(timeout=0.05)
                    return sub.endpoints[endpoint].state == "connected"

                wait_until(connected, "the reader's connection")
                got, deadline = 0, time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    got += sub.recv(timeout=0.1) is not None
            finally:
                sub.close()
                ctx.destroy(linger=0)
    finally:
        lab.close()
    assert got <= 5, f"group 0 logged {got} packets in 3 s of an idle link: the feed's own"


# -- the lab ----------------------------------------------------------------------------------------


class LabDaemon(NflogdProcess):
    """nflogd in a mount namespace of its own: an empty /run, /etc a writable overlay."""

    def __init__(self, netns, workdir: Path, **kw):
        self.mounts = workdir / "mounts"
        for d in ("upper", "work"):
            (self.mounts / d).mkdir(parents=True, exist_ok=True)
        super().__init__(netns, workdir, **kw)

    def make_config(self, **kw) -> dict:
        cfg = super().make_config(**kw)
        cfg["publish"] = {"bind": ["ipc:///run/nflogd/feed.sock", "tcp://127.0.0.1:5555"]}
        cfg["metrics"] = {"listen": None}
        return cfg

    def command(self) -> list[str]:
        m = self.mounts
        setup = (
            "mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs /run && "
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={m}/upper,workdir={m}/work /etc && "
            'exec "$@"'
        )
        return ["unshare", "-m", "sh", "-c", setup, "sh", *nflogd_command()]

    def run_block(self, block: Block, home: Path) -> tuple[int | None, str, str]:
        """Run ``block`` in the daemon's namespaces; (exit status or None if still running, out, err)."""
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        run = [sys.executable, "-c", block.code] if block.lang == "python" else ["sh", "-e", "-c", block.code]
        p = subprocess.Popen(
            ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *run],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=home,
            env=env,
        )
        try:
            out, err = p.communicate(timeout=LAB_WAIT)
            return p.returncode, out, err
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return None, out, err


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ns = NetNS()
    traffic = None
    try:
        for group in (0, 1, 5, 7):
            ns.log_rule(group, match=f"udp dport {LAB_PORT}")
        d = LabDaemon(ns, tmp_path_factory.mktemp("lab"), groups=[5, 7], node="router1")
        with d:
            traffic = SteadyTraffic(ns, [LAB_PORT], interval=0.005)
            traffic.start()
            yield d
    finally:
        if traffic is not None:
            traffic.stop()
        ns.close()


@pytest.mark.kernel
@pytest.mark.parametrize("block", of_kind("lab"))
def test_readme_block(block, lab, tmp_path):
    status, out, err = lab.run_block(block, tmp_path / "home")
    assert "Traceback" not in err, f"{block}:\n{err}"
    assert status in (0, None), f"{block}: exit {status}\n{err}"
    if block.lang == "python" and ("print(" in block.code or "prn=" in block.code):
        assert out.strip(), f"{block}: prints nothing in the lab, where its group has traffic\n{err}"


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.lang == "python"], ids=str)
def test_python_blocks_run_what_they_define(block):
    """A function a block defines is called in it: pasted, the block does what it shows."""
    tree = ast.parse(block.code)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert defined <= called, f"{block}: defines {sorted(defined - called)} and never calls it"
