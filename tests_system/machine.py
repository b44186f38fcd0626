"""A booted Debian 12 container with the built .debs at hand: the system suite's one machine.

::

    base = bookworm_root(CACHE)            # debootstrapped once, reused while it exists
    with Machine(base, debs_dir, work) as m: # a copy of it, booted with systemd-nspawn -b
        m.run("apt-get", "install", "-y", "/debs/nflogd_0.1.0_amd64.deb")
        m.run("systemctl", "is-active", "nflogd").stdout

The mirror is the host's: the Debian entries of /etc/apt/sources.list and
/etc/apt/sources.list.d/*.sources (bookworm suites only). This host has no systemd bus, so
nspawn runs with --register=no --keep-unit, and commands enter the container with
``nsenter -t <its systemd> -a``. The container has --private-network: apt downloads the
packages' Depends before the boot (into a cache kept under build/) and installs offline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
# What a router's minimal system has beside the packages' own Depends: nft for the rules.
INCLUDE = ["systemd", "systemd-sysv", "nftables", "iproute2"]
NSPAWN = ["systemd-nspawn", "-q", "--register=no", "--keep-unit"]


def host_sources() -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of the host's Debian apt sources for SUITE."""
    entries = []
    one_line = [Path("/etc/apt/sources.list")]
    one_line += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 4 and words[0] == "deb":
                words = [w for w in words[1:] if not w.startswith("[")]
                entries.append((words[0], [words[1]], words[2:]))
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                for uri in fields.get("uris", []):
                    entries.append((uri, fields.get("suites", []), fields.get("components", [])))
    return [(u, [s for s in ss if s.startswith(SUITE)], c) for u, ss, c in entries
            if any(s.startswith(SUITE) for s in ss)]  # fmt: skip


def bookworm_root(cache: Path) -> Path:
    """cache/bookworm: a minimal debootstrapped Debian 12, made once (about 3 minutes)."""
    root = cache / SUITE
    stamp = root / ".nflogd-base"
    if stamp.exists() and stamp.read_text() == " ".join(INCLUDE):
        return root
    sources = host_sources()
    mirrors = [u for u, suites, _ in sources if SUITE in suites]
    if not mirrors:
        raise RuntimeError(f"no apt source for {SUITE} in /etc/apt/sources.list(.d): need a Debian mirror")
    tmp = cache / f"{SUITE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(tmp), mirrors[0]],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    lines = [f"deb {u} {' '.join(s)} {' '.join(c)}\n" for u, s, c in sources]
    (tmp / "etc/apt/sources.list").write_text("".join(lines))
    (tmp / "etc/hostname").write_text("router1\n")
    stamp_tmp = tmp / ".nflogd-base"
    stamp_tmp.write_text(" ".join(INCLUDE))
    tmp.rename(root)
    return root


class Machine:
    """A copy of ``base`` under ``work``, with ``debs`` bound at /debs, booted; always torn down."""

    def __init__(self, base: Path, debs: Path, work: Path):
        self.base, self.debs, self.work = base, debs, work
        self.root = work / "root"
        self.archives = base.parent / "apt-archives"
        self.log = work / "console.log"
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def _binds(self) -> list[str]:
        return [f"--bind-ro={self.debs}:/debs", f"--bind={self.archives}:/var/cache/apt/archives"]

    def prepare(self, debs: list[str]) -> None:
        """Copy the base, then fetch the Depends of ``debs`` from the mirror (before the boot:
        the booted container has no network)."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(self.base), str(self.root)], check=True)
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
        fetch = [
            "apt-get",
            "-q",
            "install",
            "-y",
            "--no-install-recommends",
            "--download-only",
            *[f"/debs/{d}" for d in debs],
        ]
        for cmd in (["apt-get", "-q", "update"], fetch):
            subprocess.run([*NSPAWN, "-D", str(self.root), *self._binds(), "--pipe", *cmd],
                           check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip

    def boot(self, timeout: float = 120) -> None:
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [*NSPAWN, "-b", "-D", str(self.root), "--private-network", "--console=pipe", *self._binds()],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + timeout
        while not self.pid:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot; console:\n{self.log.read_text()[-3000:]}")
            self.pid = _descendant(self.proc.pid, "systemd")
            time.sleep(0.1)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"container state {state!r} after {timeout}s")
            time.sleep(0.3)

    def run(self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 120,
            user: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """``cmd`` inside the container (as root, or as ``user`` through runuser)."""
        if user is not None:
            cmd = ("runuser", "-u", user, "--", *cmd)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LANG": "C.UTF-8",
        }
        # its own session: a stray "kill 0" inside must not reach pytest
        res = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *cmd], input=input, text=True,
                             capture_output=True, timeout=timeout, env=env,
                             start_new_session=True)  # fmt: skip
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def close(self) -> None:
        """Power off (SIGTERM makes nspawn ask the container's systemd to halt), kill after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _descendant(pid: int, comm: str) -> int:
    """The first process below ``pid`` named ``comm`` (nspawn's child is the container's PID 1)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        try:
            if (Path("/proc") / str(p) / "comm").read_text().strip() == comm:
                return p
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return 0
