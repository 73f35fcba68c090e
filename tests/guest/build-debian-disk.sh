#!/bin/bash
# build-debian-disk.sh [CACHE_DIR] - build a small bootable Debian bookworm
# disk image for the BIOS boot test (tests/tests/bios_linux.rs): an MBR
# partition table with one ext4 root partition, debootstrap --variant=minbase
# from the mirror /etc/apt/sources.list.d/debian.sources names, Debian's cloud
# kernel (linux-image-cloud-amd64), GRUB for BIOS from grub-pc (boot.img in
# the MBR, a core.img from grub-mkimage in the gap before the partition: what
# grub-install --target=i386-pc writes, done by hand so that it needs no
# partition scanning on loop devices, which containers often lack), the
# kernel and GRUB on the
# serial console (console=ttyS0), systemd's serial getty on ttyS0 and an
# empty root password: booted through SeaBIOS, ttyS0 shows
# "vmd-debian login:".
#
# Output: CACHE_DIR/debian-disk-<suite>-<sha256(script, suite, mirror):12>/
#   disk.raw    2 GiB sparse raw image (about 500 MiB used)
#   packages    dpkg -l of the image;  kernel-release
#   .done       stamp: the directory is complete
# CACHE_DIR defaults to <repo>/.cache (git-ignored).  A complete directory is
# reused as is (the mirror here is a dated snapshot, so the same inputs give
# the same packages).  The image's path is the last line on stdout; progress
# goes to stderr.  A test that boots it should boot a copy.
#
# Runs as root (loop devices, mount, chroot).  Env: SKIP_APT=1 skips
# apt-get update/install of the host tools (debootstrap fdisk e2fsprogs
# mount); SUITE (bookworm); MIRROR (default: the first URIs: of
# debian.sources).  Network traffic: Debian's mirror only.
set -euo pipefail

log() { echo "build-debian-disk: $*" >&2; }
die() { log "error: $*"; exit 1; }

SELF=$(realpath "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/../.." && pwd)
CACHE=$(realpath -m "${1:-$REPO/.cache}")
SUITE=${SUITE:-bookworm}
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
KEY=$( { cat "$SELF"; echo "$SUITE $MIRROR"; } | sha256sum | cut -c1-12)
OUT=$CACHE/debian-disk-$SUITE-$KEY
SIZE_MIB=2048
HOSTNAME_=vmd-debian
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

if [ -e "$OUT/.done" ]; then echo "$OUT/disk.raw"; exit 0; fi
[ "$(id -u)" = 0 ] || die "must run as root"

if [ "${SKIP_APT:-0}" != 1 ]; then
  log "apt-get update / install host tools"
  timeout 300 apt-get update -qq >&2
  timeout 600 apt-get install -y -qq --no-install-recommends \
    debootstrap fdisk e2fsprogs mount >&2
fi
for t in debootstrap sfdisk mkfs.ext4 losetup mount chroot blkid; do
  command -v "$t" >/dev/null || die "missing tool: $t (install it or drop SKIP_APT)"
done

START=$SECONDS
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.debian-disk.XXXXXX")
MNT=$WORK/mnt
LOOP=
cleanup() {
  set +e
  for m in dev/pts dev proc sys ""; do
    mountpoint -q "$MNT/$m" 2>/dev/null && umount -l "$MNT/$m"
  done
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$MNT" "$WORK/out"
IMG=$WORK/out/disk.raw

# 1. disk: one bootable Linux partition from 1 MiB (GRUB's core image goes
#    in the gap before it), ext4 on a loop device over the partition alone.
truncate -s "${SIZE_MIB}M" "$IMG"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$IMG" >&2
[ "$(sfdisk -d "$IMG" | awk -F'[=,]' '/start=/ { gsub(/ /, "", $2); print $2 }')" = 2048 ] ||
  die "sfdisk did not put the partition at sector 2048"
LOOP=$(losetup --show -f -o $((1 << 20)) --sizelimit $(((SIZE_MIB - 1) << 20)) "$IMG")
PART=$LOOP
mkfs.ext4 -q -F -L vmd-root "$PART" >&2
UUID=$(blkid -s UUID -o value "$PART")
mount "$PART" "$MNT"
log "disk $IMG, root partition on $PART, UUID=$UUID"

# 2. base system
log "debootstrap --variant=minbase $SUITE from $MIRROR"
timeout 1200 debootstrap --variant=minbase --include=systemd-sysv,udev \
  "$SUITE" "$MNT" "$MIRROR" >&2 || die "debootstrap failed"

# 3. kernel and GRUB, inside the image
for m in dev dev/pts proc sys; do mount --bind "/$m" "$MNT/$m"; done
in_root() { chroot "$MNT" "$@"; }
echo "$HOSTNAME_" > "$MNT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$HOSTNAME_" > "$MNT/etc/hosts"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$UUID" > "$MNT/etc/fstab"
# grub-pc's postinst must not pick install devices itself: we install below.
printf '%s\n' 'grub-pc grub-pc/install_devices multiselect ' \
  'grub-pc grub-pc/install_devices_empty boolean true' | in_root debconf-set-selections
timeout 1200 chroot "$MNT" apt-get install -y -q --no-install-recommends \
  linux-image-cloud-amd64 grub-pc >&2 || die "installing the kernel and GRUB failed"
cat >> "$MNT/etc/default/grub" <<'EOF'

# vmd test image: everything on the serial console, no menu delay.
GRUB_TIMEOUT=0
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
# What grub-install --target=i386-pc does, minus the probing: modules under
# /boot/grub, a core image that finds them on the first partition of the
# BIOS boot disk (the drive SeaBIOS passes in %dl), written after the MBR.
in_root sh -c 'mkdir -p /boot/grub/i386-pc && cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /boot/grub/i386-pc/'
in_root grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 >&2
cp "$MNT/usr/lib/grub/i386-pc/boot.img" "$MNT/boot/grub/i386-pc/core.img" "$WORK/"
[ "$(stat -c %s "$WORK/core.img")" -lt $((2047 * 512)) ] || die "core.img does not fit before the partition"
# grub-mkconfig's 10_linux skips a root on a file-backed loop device (this
# build's), so name the guest's root for this run only.
mkdir -p "$MNT/etc/default/grub.d"
echo "GRUB_DEVICE=UUID=$UUID" > "$MNT/etc/default/grub.d/zz-vmd-build.cfg"
in_root update-grub >&2
rm "$MNT/etc/default/grub.d/zz-vmd-build.cfg"
grep -q "root=UUID=$UUID" "$MNT/boot/grub/grub.cfg" ||
  die "grub.cfg has no root=UUID=$UUID: $(grep -E '^\s*(linux|search)' "$MNT/boot/grub/grub.cfg" | head -4)"
grep -q 'console=ttyS0' "$MNT/boot/grub/grub.cfg" || die "grub.cfg lacks console=ttyS0"
# An empty root password: the serial getty's login: prompt takes "root".
in_root passwd -d root >&2
in_root systemctl enable serial-getty@ttyS0.service >&2 ||
  log "warning: systemctl enable serial-getty@ttyS0 failed (console=ttyS0 starts it anyway)"
ls "$MNT/lib/modules" > "$WORK/out/kernel-release"
in_root dpkg -l > "$WORK/out/packages"
in_root apt-get clean

# 4. detach, check, publish
for m in dev/pts dev proc sys ""; do umount "$MNT/$m"; done
e2fsck -fy "$PART" >&2 || [ $? -le 1 ] || die "e2fsck failed"
losetup -d "$LOOP"; LOOP=
# boot.img's first 440 bytes (the partition table and signature stay); its
# defaults load core.img from sector 1, whose first sector reads the rest
# from sector 2 on: the layout grub-mkimage's i386-pc image expects.
dd if="$WORK/boot.img" of="$IMG" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$IMG" bs=512 seek=1 conv=notrunc status=none
touch "$WORK/out/.done"
if ! mv -T "$WORK/out" "$OUT" 2>/dev/null; then
  [ -e "$OUT/.done" ] || { rm -rf "$OUT"; mv -T "$WORK/out" "$OUT"; }
fi
log "done in $((SECONDS - START)) s: $(du -h --apparent-size "$OUT/disk.raw" | cut -f1) apparent, $(du -h "$OUT/disk.raw" | cut -f1) used"
echo "$OUT/disk.raw"
