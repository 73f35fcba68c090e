#!/bin/sh
# Regenerates the seed corpora under fuzz/corpus/ (run from anywhere).
# The kept corpora are these seeds plus what fuzzing found, minimized with
# `cargo fuzz cmin`; rerunning this only adds files.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fuzz} cargo run -q -p vmd-fuzz-seedgen

# vm.conf: the example and the regress cases.
mkdir -p corpus/config_parse
cp ../etc/vm.conf corpus/config_parse/etc-vm.conf
for f in ../tests/config/*.conf; do cp "$f" "corpus/config_parse/$(basename "$f")"; done

# qcow2 images from qemu-img: 16 control bytes (read at 0, write in the
# middle, read it back, discard, flush) then the image.
if command -v qemu-img >/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    seed() { # name ctl0 image
        { printf "\\$(printf %o "$2")"; printf '\010\000\000\021\200\000\020\200\000\003\200\000\002\000\000'; cat "$3"; } \
            > "corpus/qcow2_open/qemu-$1"
    }
    q() { qemu-img create -q -f qcow2 "$@"; }
    q -o compat=0.10,cluster_size=512 "$tmp/v2.qcow2" 1M && seed v2-c512 0 "$tmp/v2.qcow2"
    q -o compat=1.1,cluster_size=4096 "$tmp/v3.qcow2" 8M && seed v3-c4k 0 "$tmp/v3.qcow2"
    q -o cluster_size=1024,refcount_bits=1 "$tmp/rc1.qcow2" 1M && seed v3-rc1 0 "$tmp/rc1.qcow2"
    q -o cluster_size=1024,refcount_bits=64 "$tmp/rc64.qcow2" 1M && seed v3-rc64 0 "$tmp/rc64.qcow2"
    q -o cluster_size=512,lazy_refcounts=on "$tmp/lazy.qcow2" 1M && seed v3-lazy 1 "$tmp/lazy.qcow2"
    if command -v qemu-io >/dev/null; then
        q -o cluster_size=512 "$tmp/data.qcow2" 1M
        qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -z 8k 4k' -c 'write -P 0x22 512k 512' \
            "$tmp/data.qcow2" >/dev/null
        seed v3-data 0 "$tmp/data.qcow2"
        seed v3-data-ro 1 "$tmp/data.qcow2"
        qemu-img convert -c -O qcow2 -o cluster_size=4096 "$tmp/data.qcow2" "$tmp/comp.qcow2"
        seed v3-compressed 1 "$tmp/comp.qcow2"
    fi
    : > "$tmp/base.raw"; truncate -s 64K "$tmp/base.raw"
    q -o cluster_size=512 -b base.raw -F raw "$tmp/ov.qcow2" && seed overlay-raw 2 "$tmp/ov.qcow2"
    q -o cluster_size=512 "$tmp/base.qcow2" 1M
    q -o cluster_size=512 -b base.qcow2 -F qcow2 "$tmp/ov2.qcow2" 1M && seed overlay-qcow2 2 "$tmp/ov2.qcow2"
fi
for d in corpus/*/; do echo "$d: $(ls "$d" | wc -l) files, $(du -sk "$d" | cut -f1) KiB"; done
