# Two commands on a fresh Debian machine, as root, from the checkout:
#   make run    install what is missing, then run the daemon with etc/nflogd.yaml
#   make test   install what is missing, then the checks and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CONFIG ?= etc/nflogd.yaml
# Debian packages. To run: the NFLOG and netlink libraries with headers, a compiler and
# Python headers for the CFFI module. For the tests also: nft and ip, tcpdump for the bench
# and (with tshark) to read back nflog-tap's pcap files, systemd for systemd-analyze verify
# and systemd-sysusers on the unit files, iptables for the rules in docs/operations.md, jq to
# read back nflog-tap's JSON lines. tcpdump and tshark bring libpcap, which compiles
# nflogd-extcap's capture filters. python3-zmq (Debian's libzmq, another version than pyzmq's)
# and libjeromq-java with a JDK (JeroMQ, ZMTP 2.0, no libzmq) are the other implementations
# tests/test_interop.py runs against the feed's own server.
RUN_DEBS := libnetfilter-log-dev libmnl-dev libsodium-dev libpcap-dev gcc libc6-dev pkg-config python3-dev python3-venv
TEST_DEBS := nftables iproute2 tcpdump tshark systemd iptables jq python3-zmq libjeromq-java default-jdk-headless
DEBS := $(RUN_DEBS) $(TEST_DEBS)
# promtool checks contrib/prometheus/: taken out of Debian's prometheus package into the venv,
# since installing that package would also enable and start a Prometheus server.
PROMTOOL := $(VENV)/bin/promtool
# nats-server (JetStream) for tests/test_jetstream.py and bench/jetstream.py: taken out of Debian's
# nats-server package into the venv, since installing that package enables and starts a server
# on port 4222; the tests start their own on free loopback ports.
NATS_SERVER := $(VENV)/bin/nats-server
# mypy with the stubs of the libraries that ship none (PyYAML, cffi): make check runs it.
DEV_PKGS := pytest pytest-timeout hypothesis ruff mypy types-PyYAML types-cffi
APT := apt-get -o DPkg::Lock::Timeout=600
SOURCES := pyproject.toml setup.py scapy_nflog.py nflog_cffi.py client/pyproject.toml client/nflogd_client/VERSION nflogd/_nflog.h nflogd/_nflog.c nflogd/feed/_feed.h nflogd/feed/_feed.c nflogd/feed/_peers.h nflogd/feed/_peers.c nflogd/feed/_filter.h nflogd/feed/_filter.c nflogd/ffi_build.py

.PHONY: all deps run-deps debs run-debs run test check bench bench-debs profile profile-relay clean deb deb-tools test-system extcap-install test-vm vm-debs bench-vm
all: test

# install-debs PACKAGES: apt-get install those of PACKAGES that are missing
define install-debs
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    $(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $$missing; \
	fi
endef

run-debs:
	$(call install-debs,$(RUN_DEBS))

debs:
	$(call install-debs,$(DEBS))

# What running needs: both distributions in the venv, no test tools.
$(VENV)/.installed-run: $(SOURCES) | run-debs
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e ./client -e .
	touch $@

# The tests' too: the client's jetstream extra (nats-py) for tests/test_jetstream.py. Again when
# the Makefile changes, so that a venv made before gets a tool added to DEV_PKGS.
$(VENV)/.installed: $(VENV)/.installed-run Makefile | debs
	$(VPY) -m pip install -q --disable-pip-version-check -e './client[jetstream]' $(DEV_PKGS)
	touch $@

$(PROMTOOL): | $(VENV)/.installed
	tmp=$$(mktemp -d) && chmod 755 $$tmp && cd $$tmp && \
	{ apt-get download -q prometheus || { apt-get update -q && apt-get download -q prometheus; }; } && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > $(CURDIR)/$@.tmp && \
	chmod 755 $(CURDIR)/$@.tmp && mv $(CURDIR)/$@.tmp $(CURDIR)/$@; rc=$$?; rm -rf $$tmp; exit $$rc

$(NATS_SERVER): | $(VENV)/.installed
	tmp=$$(mktemp -d) && chmod 755 $$tmp && cd $$tmp && \
	{ apt-get download -q nats-server || { apt-get update -q && apt-get download -q nats-server; }; } && \
	dpkg-deb --fsys-tarfile nats-server_*.deb | tar -xO ./usr/sbin/nats-server > $(CURDIR)/$@.tmp && \
	chmod 755 $(CURDIR)/$@.tmp && mv $(CURDIR)/$@.tmp $(CURDIR)/$@; rc=$$?; rm -rf $$tmp; exit $$rc

deps: debs $(VENV)/.installed $(PROMTOOL) $(NATS_SERVER)
run-deps: run-debs $(VENV)/.installed-run

# The package's access model without systemd: group nflog (systemd/nflogd.sysusers) reads the
# ipc feed. make run creates the group if missing and runs the daemon as root with nflog as its
# group, so that /run/nflogd is root:nflog 0750 and the socket 0660, the package's modes; a
# reader joins the group (usermod -aG nflog alice, then a new login).
run: run-deps
	getent group nflog >/dev/null || groupadd --system nflog
	setpriv --regid=nflog --clear-groups $(VENV)/bin/nflogd -c $(CONFIG)

check: deps
	$(VENV)/bin/ruff check nflogd client tests tests_system tests_vm bench fuzz scapy_nflog.py nflog_cffi.py
	$(VENV)/bin/ruff format --check nflogd client tests tests_system tests_vm bench fuzz scapy_nflog.py nflog_cffi.py
	$(VENV)/bin/mypy  # what and how strictly: [tool.mypy] in pyproject.toml

test: check
	$(VPY) -m pytest -q -p no:cacheprovider tests

# make test-asan: the C module built with AddressSanitizer and UndefinedBehaviorSanitizer
# (NFLOGD_SANITIZE=1, into build/asan beside a copy of the package) runs the tests of the C paths:
# the reader, the capture loop, the feed's senders and server, CURVE's boxes, the relay's
# upstream reader. libasan is preloaded into the Python process (leak detection off: Python's
# own allocations are not ours); any finding ends the run.
ASAN_TESTS := tests/test_capture.py tests/test_capture_loop.py tests/test_classic.py tests/test_publish.py \
    tests/test_zmtp.py tests/test_zmtp_spec.py tests/test_curve.py tests/test_upstream_reader.py
# The Python fallback loop under a GIL hog is timing: ASan slows its draining past the test's deadline.
ASAN_DESELECT := --deselect tests/test_capture_loop.py::test_fallback_python_loop_loses_packets_when_the_gil_is_held
.PHONY: test-asan
test-asan: $(VENV)/.installed
	rm -rf build/asan && mkdir -p build/asan
	NFLOGD_SANITIZE=1 $(VPY) -c 'import sys; sys.path.insert(0, "nflogd"); import ffi_build; \
	    ffi_build.ffibuilder.compile(tmpdir="build/asan")' > build/asan/build.log 2>&1 || { tail -20 build/asan/build.log; exit 1; }
	tar --exclude='*.so' --exclude='*.o' --exclude=__pycache__ -cf - nflogd | tar -C build/asan -xf -
	cd build/asan && export LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	    $(CURDIR)/$(VPY) -c 'import nflogd._nflog_cffi as m, sys; sys.exit("build/asan" not in m.__file__)' && \
	    $(CURDIR)/$(VPY) -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) $(ASAN_DESELECT) $(addprefix $(CURDIR)/,$(ASAN_TESTS))

# The bench's other readers and the profilers: ulogd2 with its pcap output beside tcpdump,
# perf and strace for bench/profile.py and bench/profile_relay.py.
BENCH_DEBS := ulogd2 ulogd2-pcap linux-perf strace
bench-debs:
	@missing=$$(for p in $(BENCH_DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    $(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $$missing; \
	fi

bench: deps bench-debs
	$(VPY) bench/run.py

profile: deps bench-debs
	$(VPY) bench/profile.py

profile-relay: deps bench-debs
	$(VPY) bench/profile_relay.py
	$(VPY) bench/profile_relay.py --zmq

# make extcap-install: nflogd-extcap into this user's Wireshark extcap folder (tshark -G folders);
# EXTCAP_ARGS=--system for the system folder (as root), or EXTCAP_ARGS="--extcap-dir DIR".
EXTCAP_ARGS ?=
extcap-install: $(VENV)/.installed-run
	$(VENV)/bin/nflogd-extcap --install $(EXTCAP_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info nflogd/_nflog_cffi*.so

# make fuzz: coverage-guided fuzzing (atheris) of the feed decoder (fuzz/fuzz_wire.py) and of the
# feed server's ZMTP codec (fuzz/fuzz_zmtp.py) and its CURVE layer (fuzz/fuzz_curve.py), FUZZ_SECONDS each, seeded from fuzz/corpus/wire
# and fuzz/corpus/zmtp; new inputs and any crash input go to FUZZ_WORK/wire and FUZZ_WORK/zmtp.
FUZZ_SECONDS ?= 60
FUZZ_WORK ?= /tmp/nflogd-fuzz
.PHONY: fuzz
fuzz: $(VENV)/.installed
	$(VPY) -c 'import atheris' 2>/dev/null || $(VPY) -m pip install -q --disable-pip-version-check atheris
	for target in wire zmtp curve; do \
	    mkdir -p $(FUZZ_WORK)/$$target/corpus && \
	    $(VPY) fuzz/fuzz_$$target.py $(FUZZ_WORK)/$$target/corpus fuzz/corpus/$$target \
	        -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -artifact_prefix=$(FUZZ_WORK)/$$target/ || exit 1; \
	done

# make deb: the Debian packages nflogd and python3-nflogd-client (debian/), built with
# dpkg-buildpackage from a copy of the checkout (tracked and new files) in build/deb/nflogd, so
# that every artefact stays under build/; the .debs and lintian's report land in build/deb/.
# Debian's own python3 and tools only (PATH reset: no pyenv or venv python). The build tools are debian/control's Build-Depends (apt-get build-dep), plus lintian.
DEB_DIR := build/deb
DEB_SRC := $(DEB_DIR)/nflogd
deb-tools:
	@missing=$$(for p in lintian debootstrap systemd-container; do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ] || ! dpkg-checkbuilddeps debian/control 2>/dev/null; then \
	    echo "installing Debian packages: build-dep ./ " $$missing; \
	    $(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $$missing dpkg-dev && \
	    DEBIAN_FRONTEND=noninteractive $(APT) build-dep -y -q ./; \
	fi

deb: deb-tools
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_SRC)
	git ls-files -z --cached --others --exclude-standard | \
	    tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEB_SRC)
	cd $(DEB_SRC) && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign > ../build.log 2>&1 \
	    || { tail -40 ../build.log; exit 1; }
	cd $(DEB_DIR) && { lintian --info --display-info --pedantic --fail-on error,warning \
	    --suppress-tags bad-distribution-in-changes-file *.changes > lintian.txt; \
	    rc=$$?; cat lintian.txt; exit $$rc; }
	@ls $(DEB_DIR)/*.deb

# make test-system: the .debs installed with apt in a booted Debian 12 container (tests_system/):
# debootstrapped once into build/system/bookworm from the host's apt sources, copied for each
# run, booted with systemd-nspawn, checked under its systemd, and removed at the end.
test-system: deb $(VENV)/.installed
	$(VPY) -m pytest -q -p no:cacheprovider tests_system

# make test-vm: the tests of tests/ that need what this host's kernel may lack (NFLOG with
# conntrack, 8021q) run in a QEMU guest with Debian's own kernel (tests_vm/): the system suite's
# debootstrapped bookworm (build/system/bookworm) with the kernel and the tests' packages,
# made a disk image with mkfs.ext4 -d and cached in build/system/vm/ by what went into it;
# booted with KVM where the CPU offers it, else emulated (TCG), with no network device.
VM_DEBS := qemu-system-x86 debootstrap systemd-container e2fsprogs
vm-debs:
	$(call install-debs,$(VM_DEBS))

test-vm: vm-debs $(VENV)/.installed
	$(VPY) -m pytest -q -p no:cacheprovider tests_vm

# make bench-vm: bench/run.py's conntrack part (the daemon's CPU per packet with conntrack: true
# beside the same group without it and ulogd2's NFLOG with attach_conntrack) in make test-vm's
# guest, whose kernel attaches conntrack to NFLOG (bench/vm.py).
bench-vm: vm-debs deps
	$(VPY) bench/vm.py
