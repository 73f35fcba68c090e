# The Debian packages vmd and its tests need: the one list, sourced by
# quickstart.sh (run time and build) and tests/run (all of it; .ci/run
# calls tests/run). `install_packages LIST...` installs only what is
# missing, so a machine that has everything needs no network.

# What vmd needs at run time: SeaBIOS is the firmware of every VM without
# a kernel; iPXE's virtio ROM boots `boot device net`.
RUNTIME_PACKAGES="seabios ipxe-qemu"
# What building vmd and the test guests needs (gcc, binutils, libc headers;
# passwd's useradd makes the _vmd user at first start).
BUILD_PACKAGES="gcc binutils libc6-dev passwd"
# What the tests need besides: g++ builds libFuzzer for the fuzz pass;
# cpio, kmod, e2fsprogs and the compressors build the Linux test guest
# (tests/guest/) from Debian's packages; qemu-utils (qemu-img, qemu-io)
# judges our qcow2 images; util-linux (runuser), iproute2, iputils-ping
# and procps drive the tests; rsyslog is the syslog a test reads back;
# xorriso builds the test ISO (El Torito); tftpd-hpa's in.tftpd serves the
# network boot test's file (the test runs it in its own network namespace;
# the package's own service is not wanted); python3-prometheus-client's
# parser reads vmd's metrics the way Prometheus does.
TEST_PACKAGES="g++ cpio kmod e2fsprogs gzip lz4 xz-utils zstd qemu-utils util-linux
    iproute2 iputils-ping procps rsyslog xorriso tftpd-hpa python3-prometheus-client"

install_packages() {
    local missing=() p
    for p in $*; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No package's own service is started by the install (tftpd-hpa would
    # serve TFTP on every address); a policy-rc.d of our own is removed
    # again afterwards.
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
    fi
    local rc=0
    timeout 600 apt-get update -qq || rc=$?
    if [ $rc -eq 0 ]; then
        timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >/dev/null || rc=$?
    fi
    [ -n "$policy" ] && rm -f "$policy"
    return $rc
}
