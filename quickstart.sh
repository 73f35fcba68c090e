#!/bin/bash
# Sets vmd up on a fresh Debian machine and boots a first VM: installs the
# packages vmd needs to build and run, builds and installs vmd and vmctl, starts vmd, then boots
# the small test guest with 2 vCPUs and shows its console until it powers
# off. Run as root.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root" >&2; exit 1; }
if ! cargo --version >/dev/null 2>&1; then
    echo "quickstart: cargo not found: install Rust 1.85 or later (https://rustup.rs), then run this again" >&2
    exit 1
fi
# What vmd needs to build and to run (SeaBIOS, the iPXE ROMs): the list
# tests/run uses too.
. tests/packages.sh
install_packages $BUILD_PACKAGES $RUNTIME_PACKAGES
cargo build --release --locked --bins
install -m 0755 target/release/vmd /usr/local/sbin/vmd
install -m 0755 target/release/vmctl /usr/local/sbin/vmctl
install -d /usr/local/share/man/man8
install -m 0644 vmd-parent/vmd.8 vmctl/vmctl.8 /usr/local/share/man/man8/
install -d /var/lib/vmd/guests
tests/guests/build.sh /var/lib/vmd/guests >/dev/null
if ! vmctl status >/dev/null 2>&1; then
    vmd                                   # daemonizes; logs go to syslog
    for _ in $(seq 100); do [ -S /run/vmd.sock ] && break; sleep 0.1; done
fi
vmctl stop -f -w demo >/dev/null 2>&1 || true
# -c attaches the console; the guest prints what it found and powers off.
vmctl start -c -b /var/lib/vmd/guests/hello.elf -m 64M --vcpus 2 \
    --cmdline "hello from vmd quickstart" demo
vmctl status
