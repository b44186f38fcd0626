"""A Debian 12 guest with Debian's own kernel, booted with QEMU: what a router's kernel has
that the host's may lack (NFLOG with conntrack, 8021q).

::

    image = guest_image(CACHE)                 # built once per content, reused while it exists
    res = Guest(image, work).run("cd /repo && ...", timeout=150)
    res.rc, res.output

The image is the system suite's debootstrapped bookworm (tests_system/machine.py's
bookworm_root, the one owner of it) copied, with GUEST_DEBS installed into it from the host's
apt sources, made a disk with ``mkfs.ext4 -d`` (no loop device) and booted with
``qemu-system-x86_64 -kernel/-initrd`` of its own kernel, serial console, no network device.
The guest does not boot systemd: its PID 1 is INIT, which mounts the host's shares (9p over
virtio), runs the script the host left in the ``out`` share, writes its output and exit
status there and powers off. Shared are the checkout (read-write, at the host's path, so that
the venv's editable install resolves) and, when the venv's interpreter lives outside /usr
(pyenv), its prefix (read-only, at the same path): the guest runs the very venv and C module
the host tests run. The disk is booted with ``snapshot=on``: every run starts from the image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_system"))
from machine import INCLUDE, NSPAWN, bookworm_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The kernel and its module tools; the C module's libraries; what a pyenv interpreter links
# (Debian's python3 for a venv made from /usr/bin/python3); nft and ip for the tests' rules;
# ulogd2 with its pcap output for the bench.
GUEST_DEBS = [
    "linux-image-amd64", "kmod", "initramfs-tools",
    "libnetfilter-log1", "libmnl0", "libnfnetlink0", "libsodium23", "libpcap0.8",
    "python3", "libssl3", "libffi8", "libsqlite3-0", "libbz2-1.0", "liblzma5", "libreadline8",
    "libncursesw6", "libuuid1", "zlib1g", "libexpat1", "libcrypt1", "libnsl2", "libtirpc3",
    "nftables", "iproute2", "procps", "ulogd2", "ulogd2-pcap",
]  # fmt: skip

# PID 1 of the guest. The initramfs has mounted the root and moved /dev, /proc, /sys and /run
# onto it; /out/mounts lists the other shares as "TAG PATH MODE" lines.
INIT = """#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
modprobe -a 9p 9pnet_virtio
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /out && mount -t 9p -o $opts out /out || {
    echo "nflogd-guest: no out share"; echo o > /proc/sysrq-trigger; }
while read -r tag path mode; do
    mkdir -p "$path" && mount -t 9p -o "$opts,$mode" "$tag" "$path" || echo "nflogd-guest: cannot mount $tag"
done < /out/mounts
ip link set lo up
echo "nflogd-guest: running $(uname -r)"
sh /out/run.sh > /out/output 2>&1
echo $? > /out/rc.tmp && mv /out/rc.tmp /out/rc
sync
echo "nflogd-guest: done, exit $(cat /out/rc)"
echo o > /proc/sysrq-trigger
sleep 30
"""
INIT_PATH = "/sbin/nflogd-guest-init"


@dataclass
class Image:
    disk: Path
    kernel: Path
    initrd: Path
    release: str


def image_key() -> str:
    """What went into the image: the base's packages, the guest's, the init, the sources."""
    from machine import host_sources

    text = repr((INCLUDE, GUEST_DEBS, INIT, host_sources()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def guest_image(cache: Path) -> Image:
    """cache/vm/KEY: the guest's disk, kernel and initrd, built when missing (~2 minutes past
    the base's debootstrap); images of other keys are removed."""
    vm = cache / "vm"
    key = image_key()
    done = vm / key
    if not (done / "ready").exists():
        base = bookworm_root(cache)
        shutil.rmtree(vm, ignore_errors=True)
        vm.mkdir(parents=True)
        root, tmp = vm / "root", vm / f"{key}.tmp"
        subprocess.run(["cp", "-a", str(base), str(root)], check=True)
        archives = cache / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "-q", "install", "-y", "--no-install-recommends", *GUEST_DEBS]
        for cmd in (["apt-get", "-q", "update"], install):
            subprocess.run([*NSPAWN, "-D", str(root), f"--bind={archives}:/var/cache/apt/archives", "--pipe",
                            *cmd], check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
        init = root / INIT_PATH.lstrip("/")
        init.write_text(INIT)
        init.chmod(0o755)
        tmp.mkdir()
        boot = root / "boot"
        kernel = max(boot.glob("vmlinuz-*"))
        release = kernel.name.removeprefix("vmlinuz-")
        shutil.copy(kernel, tmp / "vmlinuz")
        shutil.copy(boot / f"initrd.img-{release}", tmp / "initrd.img")
        (tmp / "release").write_text(release)
        size = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])  # fmt: skip
        disk = tmp / "disk.img"
        with open(disk, "wb") as f:
            f.truncate((size + size // 2 + 512) << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "guest", "-d", str(root), str(disk)], check=True)
        shutil.rmtree(root)
        (tmp / "ready").write_text(key)
        tmp.rename(done)
    return Image(done / "disk.img", done / "vmlinuz", done / "initrd.img", (done / "release").read_text())


@dataclass
class Result:
    rc: int | None  # None: the guest never said (it hung or crashed: see console)
    output: str
    console: str
    seconds: float
    kvm: bool


def have_kvm() -> bool:
    """KVM that can run the guest: /dev/kvm, and a CPU that shows its virtualisation extension
    (a /dev/kvm without it, as in some nested setups, runs the kernel's decompressor for
    minutes). NFLOGD_VM_ACCEL=kvm or tcg overrides."""
    forced = os.environ.get("NFLOGD_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and bool(flags and {"vmx", "svm"} & set(flags[1].split()))


class Guest:
    """One boot of ``image`` running one shell script; its files live in ``work``."""

    def __init__(self, image: Image, work: Path):
        self.image, self.work = image, work

    def shares(self) -> list[tuple[str, Path, bool]]:
        """(tag, host path, writable): the checkout, and the venv interpreter's prefix when it
        lives outside /usr."""
        out = [("repo", REPO, True)]
        prefix = Path(sys.base_prefix).resolve()
        if not str(prefix).startswith("/usr"):
            out.append(("python", prefix, False))
        return out

    def command(self) -> list[str]:
        kvm = have_kvm()
        cmd = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-machine", "q35", "-accel", "kvm" if kvm else "tcg,thread=multi",
            "-cpu", "host" if kvm else "max",
            "-smp", "2", "-m", "2048", "-nic", "none",
            "-serial", f"file:{self.work / 'console.log'}",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", f"console=ttyS0 root=/dev/vda rw init={INIT_PATH} panic=-1 fsck.mode=skip quiet",
            "-drive", f"file={self.image.disk},format=raw,if=virtio,snapshot=on",
            "-virtfs", f"local,path={self.work / 'out'},mount_tag=out,security_model=passthrough,id=out",
        ]  # fmt: skip
        for tag, path, writable in self.shares():
            ro = "" if writable else ",readonly=on"
            cmd += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=passthrough,id={tag}{ro}"]
        return cmd

    def run(self, script: str, timeout: float | None = None) -> Result:
        """Boot, run ``script`` (sh) as root in the guest, power off. ``timeout``: 240 s with
        KVM, 1200 s without (TCG emulates every instruction)."""
        kvm = have_kvm()
        timeout = timeout or (240 if kvm else 1200)
        shutil.rmtree(self.work, ignore_errors=True)
        out = self.work / "out"
        out.mkdir(parents=True)
        (out / "mounts").write_text(
            "".join(f"{tag} {path} {'rw' if w else 'ro'}\n" for tag, path, w in self.shares())
        )
        (out / "run.sh").write_text(script)
        t0 = time.monotonic()
        with open(self.work / "qemu.log", "wb") as log:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        seconds = time.monotonic() - t0
        rc_file, out_file = out / "rc", out / "output"
        console = (
            (self.work / "console.log").read_text(errors="replace")
            if (self.work / "console.log").exists()
            else ""
        )
        qemu_log = (self.work / "qemu.log").read_text(errors="replace")
        return Result(
            rc=int(rc_file.read_text()) if rc_file.exists() else None,
            output=out_file.read_text(errors="replace") if out_file.exists() else "",
            console=console + qemu_log,
            seconds=seconds,
            kvm=kvm,
        )
