#!/bin/bash
# build-linux-guest.sh [CACHE_DIR] - build vmd's Linux test guest from Debian
# bookworm packages: the cloud kernel (bzImage and uncompressed ELF vmlinux,
# which carries a Xen PVH note), a busybox initramfs and a small ext4 disk.
#
# Output: CACHE_DIR/linux-<kernel package version>-<sha256(this script):12>/
#   vmlinuz     bzImage from the linux-image-*-cloud-amd64 package
#   vmlinux     the same kernel, uncompressed ELF64 (PVH entry note)
#   initrd.gz   gzip'd newc cpio: busybox + virtio modules + /init
#   disk.img    64 MiB raw ext4 with /marker.txt containing VMD-DISK-OK
#   config      the kernel's .config;  kernel-release, kernel-package
#   .done       stamp: the directory is complete
# CACHE_DIR defaults to <repo>/.cache (git-ignored).  A complete directory is
# reused as is.  The directory's path is the last line on stdout; progress
# goes to stderr.
#
# Runs as root (mknod, apt).  Env: SKIP_APT=1 skips apt-get update/install of
# the host tools (cpio kmod e2fsprogs gzip lz4 xz-utils zstd);
# KPKG=<package> overrides the kernel image package (default: what
# linux-image-cloud-amd64 depends on).  Packages are fetched with
# apt-get download (busybox-static is unpacked, not installed).
#
# /init in the guest (kernel command line knobs: guest.exit=reboot makes it
# reboot -f instead of poweroff -f) prints, on the console:
#   GUEST-INIT
#   GUEST-CPUS: <nproc>
#   GUEST-BLK: <block devices>        GUEST-NET: <net interfaces>
#   GUEST-DISK: <marker>              (only if /dev/vda mounts as ext4)
#   GUEST-DISK-WROTE                  (it wrote /from-guest.txt there)
#   GUEST-READY
set -euo pipefail

log() { echo "build-linux-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

SELF=$(realpath "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/../.." && pwd)
CACHE=$(realpath -m "${1:-$REPO/.cache}")
HASH=$(sha256sum "$SELF" | cut -c1-12)
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" = 0 ] || die "must run as root"

kpkg() {
  if [ -n "${KPKG:-}" ]; then echo "$KPKG"; return; fi
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | awk 'NR == 1'
}
kver() { apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'; }
outdir() { echo "$CACHE/linux-$2-$HASH"; }

# Fast path: a complete directory for the kernel apt knows about already.
PKG=$(kpkg || true)
if [ -n "$PKG" ]; then
  VER=$(kver "$PKG")
  if [ -n "$VER" ] && [ "$VER" != "(none)" ] && [ -e "$(outdir "$PKG" "$VER")/.done" ]; then
    outdir "$PKG" "$VER"; exit 0
  fi
fi

if [ "${SKIP_APT:-0}" != 1 ]; then
  log "apt-get update / install host tools"
  timeout 300 apt-get update -qq >&2
  timeout 600 apt-get install -y -qq --no-install-recommends \
    cpio kmod e2fsprogs gzip lz4 xz-utils zstd >&2
fi
for t in cpio depmod modprobe mkfs.ext4 gzip dpkg-deb apt-get; do
  command -v "$t" >/dev/null || die "missing tool: $t (install it or drop SKIP_APT)"
done

PKG=$(kpkg) || true
[ -n "$PKG" ] || die "cannot resolve linux-image-cloud-amd64's kernel package"
VER=$(kver "$PKG")
[ -n "$VER" ] && [ "$VER" != "(none)" ] || die "no candidate version for $PKG"
OUT=$(outdir "$PKG" "$VER")
if [ -e "$OUT/.done" ]; then echo "$OUT"; exit 0; fi
log "kernel package $PKG $VER -> $OUT"

START=$SECONDS
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"
mkdir "$WORK/deb" && chmod 777 "$WORK/deb"   # apt's _apt user downloads here
STAGE=$WORK/out
mkdir "$STAGE"

# 1. packages (download only; nothing is installed on the host)
(cd "$WORK/deb" && timeout 600 apt-get download -q "$PKG=$VER" busybox-static >&2) ||
  die "apt-get download failed"
dpkg-deb -x "$WORK"/deb/"$PKG"_*.deb "$WORK/kroot"
dpkg-deb -x "$WORK"/deb/busybox-static_*.deb "$WORK/bbroot"
KREL=$(ls "$WORK/kroot/lib/modules")
[ "$(echo "$KREL" | wc -l)" = 1 ] || die "expected one module tree, got: $KREL"
cp "$WORK/kroot/boot/vmlinuz-$KREL" "$STAGE/vmlinuz"
cp "$WORK/kroot/boot/config-$KREL" "$STAGE/config"
echo "$KREL" > "$STAGE/kernel-release"
echo "$PKG $VER" > "$STAGE/kernel-package"

# 2. vmlinux: locate the compressed payload through the bzImage header
#    (boot protocol >= 2.08: payload_offset at 0x248, payload_length at
#    0x24c, relative to the protected-mode code at (setup_sects+1)*512).
le32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
BZ=$STAGE/vmlinuz
[ "$(dd if="$BZ" bs=1 skip=514 count=4 status=none)" = HdrS ] || die "vmlinuz is not a bzImage"
SETUP=$(od -An -tu1 -j 497 -N1 "$BZ" | tr -d ' '); [ "$SETUP" = 0 ] && SETUP=4
POFF=$(( (SETUP + 1) * 512 + $(le32 "$BZ" 0x248) ))
PLEN=$(le32 "$BZ" 0x24c)
dd if="$BZ" of="$WORK/payload" iflag=skip_bytes,count_bytes skip="$POFF" count="$PLEN" status=none
MAGIC=$(od -An -tx1 -N4 "$WORK/payload" | tr -d ' ')
case "$MAGIC" in
  1f8b*)     DEC="gzip -dc" ;;
  fd377a58)  DEC="xz -dc" ;;
  02214c18)  DEC="lz4 -dc" ;;
  28b52ffd)  DEC="zstd -dc" ;;
  5d00*)     DEC="xz --format=lzma -dc" ;;
  425a68*)   DEC="bzip2 -dc" ;;
  *) die "unknown kernel payload compression (magic $MAGIC)" ;;
esac
log "payload at $POFF, $PLEN bytes, $DEC"
# The payload ends with the 4-byte decompressed size, which some
# decompressors treat as trailing garbage: judge by the result.
$DEC < "$WORK/payload" > "$STAGE/vmlinux" 2>/dev/null || true
[ "$(head -c4 "$STAGE/vmlinux")" = $'\x7fELF' ] || die "vmlinux extraction failed"
readelf -n "$STAGE/vmlinux" 2>/dev/null | grep -c 'Xen.*0x00000012' >/dev/null ||
  die "vmlinux has no Xen PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"

# 3. initramfs
R=$WORK/root
mkdir -p "$R"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$WORK/bbroot/bin/busybox" "$R/bin/busybox"
for a in sh mount umount insmod cat echo ls tr sed head sleep nproc uname \
         sync poweroff reboot halt mkdir; do
  ln -s busybox "$R/bin/$a"
done
ln -s bin "$R/sbin"
depmod -b "$WORK/kroot" "$KREL"
: > "$R/lib/modules/order"
for m in virtio_pci virtio_mmio virtio_blk virtio_net virtio_console; do
  modprobe -d "$WORK/kroot" -S "$KREL" --show-depends "$m"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
  base=$(basename "$ko")
  case "$base" in
    *.ko.xz)  xz -dc "$ko" > "$R/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$ko" > "$R/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *)        cp "$ko" "$R/lib/modules/$base" ;;
  esac
  echo "$base" >> "$R/lib/modules/order"
done
log "modules: $(tr '\n' ' ' < "$R/lib/modules/order")"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

cat > "$R/init" <<'INIT'
#!/bin/sh
# vmd test guest /init
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "GUEST-INIT"
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m" || echo "GUEST-WARN: insmod $m failed"
done
echo "GUEST-CPUS: $(nproc)"
sleep 0.2   # let virtio probes settle
echo "GUEST-BLK: $(ls /sys/block | tr '\n' ' ')"
echo "GUEST-NET: $(ls /sys/class/net | tr '\n' ' ')"
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /mnt 2>/dev/null; then
  echo "GUEST-DISK: $(cat /mnt/marker.txt)"
  # Write one back, so a test can read it from the host after the VM.
  echo GUEST-WROTE > /mnt/from-guest.txt && sync && echo "GUEST-DISK-WROTE"
  umount /mnt
fi
echo "GUEST-READY"
sync
exitmode=poweroff
for w in $(cat /proc/cmdline); do
  case "$w" in guest.exit=*) exitmode=${w#guest.exit=} ;; esac
done
if [ "$exitmode" = reboot ]; then reboot -f; else poweroff -f; fi
sleep 10
echo "GUEST-ERROR: still running after $exitmode"
INIT
chmod 755 "$R/init"
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
   cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -9n > "$STAGE/initrd.gz"

# 4. data disk
mkdir "$WORK/disk"; echo VMD-DISK-OK > "$WORK/disk/marker.txt"
truncate -s 64M "$STAGE/disk.img"
mkfs.ext4 -q -F -L vmd-test -d "$WORK/disk" "$STAGE/disk.img" >&2

touch "$STAGE/.done"
if ! mv -T "$STAGE" "$OUT" 2>/dev/null; then
  [ -e "$OUT/.done" ] || { rm -rf "$OUT"; mv -T "$STAGE" "$OUT"; }
fi
log "done in $((SECONDS - START)) s: $(cd "$OUT" && ls -s | tr '\n' ' ')"
echo "$OUT"
