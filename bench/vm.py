"""bench/run.py's parts that need Debian's kernel, in make test-vm's guest (tests_vm/guest.py).

    .venv/bin/python bench/vm.py                        # the conntrack part (make bench-vm)
    .venv/bin/python bench/vm.py conntrack --rate 2000  # any bench/run.py arguments

The guest boots the image make test-vm builds (its kernel attaches conntrack to NFLOG), runs
``bench/run.py ARGS --results vm.json`` from the shared checkout and powers off; its output is
printed as the guest wrote it, and the results land in bench/results/vm.json. bench/flood.c is
compiled here first (the guest has no compiler). Without KVM the guest is emulated (TCG): its
figures are then CPU of an emulated machine, comparable with each other within the run only.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests_vm"))
from guest import Guest, guest_image, have_kvm  # noqa: E402
from run import PY, flood_binary  # noqa: E402

# The defaults for an emulated guest: its loopback carries a few thousand packets a second.
TCG_ARGS = ["conntrack", "--rate", "4000", "--count", "60000"]
KVM_ARGS = ["conntrack"]


def main() -> None:
    kvm = have_kvm()
    args = sys.argv[1:] or (KVM_ARGS if kvm else TCG_ARGS)
    flood_binary()
    cache = Path(os.environ.get("NFLOGD_SYSTEM_CACHE", HERE.parent / "build" / "system")).resolve()
    image = guest_image(cache)
    print(f"guest: Debian {image.release}, {'KVM' if kvm else 'TCG (no usable KVM: emulated)'}", flush=True)
    script = (
        f"cd {shlex.quote(str(HERE.parent))}\nexport NFLOGD_TIME_SCALE={1 if kvm else 6}\n"
        f"{shlex.quote(PY)} bench/run.py {' '.join(shlex.quote(a) for a in args)} --results vm.json\n"
    )
    res = Guest(image, cache / "vm-bench").run(script, timeout=None if kvm else 1800)
    print(res.output, end="")
    if res.rc != 0:
        sys.exit(f"bench/vm.py: the guest's bench exited {res.rc}; console:\n{res.console[-2000:]}")


if __name__ == "__main__":
    main()
