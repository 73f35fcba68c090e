#!/bin/sh
# bench/run.sh - vmd vs Firecracker, Cloud Hypervisor and QEMU on this machine;
# writes docs/BENCHMARKS.md (and docs/bench-scale.svg).
# Run as root from anywhere.  Environment: RUNS (default 5), LINUX_RUNS
# (default RUNS), EXITS_N (accesses per exit phase, default 20000), ONLY
# (comma list of boot,exits,memory,scale,timeline,linuxhw,blk,net,bios; ONLY=blk,net,bios merges
# its rows into an existing OUT_MD instead of rewriting it), OUT_MD, CARGO_TARGET_DIR,
# VMD_BIN_DIR (skip the cargo build), VMLINUX (Debian vmlinux; default: the
# one tests/guest/build-linux-guest.sh caches), PEERS_DIR (firecracker and
# cloud-hypervisor binaries, default /var/tmp/peers; see bench/README.md),
# VMMS (comma list of the columns, default all found), SCALE_NS, SCALE_RUNS.  Sends no network traffic
# except apt's (only when QEMU must be installed); the net rows' traffic
# stays inside a network namespace it makes (vmdbench-net) and deletes.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root (vmd, /dev/kvm, tracefs)" >&2; exit 1; }
[ -e /dev/kvm ] || { echo "bench/run.sh: /dev/kvm missing" >&2; exit 1; }

# QEMU from Debian: bookworm's 7.2 conflicts with the qemu-utils 10.0 from
# bookworm-backports these machines ship, so take it from backports too.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
	. /etc/os-release
	if [ "${VERSION_CODENAME:-}" = bookworm ]; then
		src=/etc/apt/sources.list.d/bookworm-backports.sources
		if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
			mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
			printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
				"${mirror:-http://deb.debian.org/debian}" > "$src"
		fi
		DEBIAN_FRONTEND=noninteractive apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			-t bookworm-backports qemu-system-x86
	else
		DEBIAN_FRONTEND=noninteractive apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86
	fi
fi

if [ -z "${VMD_BIN_DIR:-}" ]; then
	cargo build --release --bins -q
	VMD_BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
GUEST_DIR=${GUEST_DIR:-$ROOT/target/bench-guests}
sh tests/guests/build.sh "$GUEST_DIR" >/dev/null
if [ -z "${VMLINUX:-}" ]; then
	VMLINUX=$(ls -d "$ROOT"/.cache/linux-*/vmlinux 2>/dev/null | tail -1 || true)
fi
PEERS_DIR=${PEERS_DIR:-/var/tmp/peers}
for p in firecracker cloud-hypervisor; do
	[ -x "$PEERS_DIR/$p" ] || echo "bench/run.sh: no $PEERS_DIR/$p: its column stays empty (bench/README.md says how to build it)" >&2
done
export VMD_BIN_DIR GUEST_DIR VMLINUX PEERS_DIR
exec python3 bench/bench.py
