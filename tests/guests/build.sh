#!/bin/sh
# build.sh OUTDIR - build the freestanding vmd test guests into OUTDIR:
#   hello.elf reset.elf spin.elf badinsn.elf echo.elf bench_boot.elf bench_exits.elf blk.elf net.elf
# Needs only gcc and binutils (Debian: gcc, binutils; no multilib).
# Fails if the code contains instructions the nested KVM's emulator cannot
# run at CPL0 (see README.md); badinsn.elf may contain exactly one xrstor.
set -eu

SRC=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
OBJ=$OUT/obj
mkdir -p "$OBJ"

CC=${CC:-gcc}
LD=${LD:-ld}
OBJDUMP=${OBJDUMP:-objdump}
CFLAGS="-m64 -march=x86-64 -mtune=generic -O2 -std=gnu11 -Wall -Wextra -Werror
  -ffreestanding -nostdlib -fno-builtin -fno-pic -fno-pie -fno-stack-protector
  -fcf-protection=none -fno-asynchronous-unwind-tables -fno-unwind-tables
  -fno-tree-loop-distribute-patterns -mgeneral-regs-only -mno-red-zone
  -mcmodel=small"
LDFLAGS="-m elf_x86_64 -nostdlib -static -no-pie --build-id=none
  -z max-page-size=0x1000 -z noexecstack"
# binutils >= 2.39 warns about our single RWX segment; silence it if we can.
if $LD --help 2>/dev/null | grep -q -- --no-warn-rwx-segments; then
	LDFLAGS="$LDFLAGS --no-warn-rwx-segments"
fi

cc() { $CC $CFLAGS -c "$1" -o "$2"; }

cc "$SRC/start.S" "$OBJ/start.o"
cc "$SRC/ap.S" "$OBJ/ap.o"
cc "$SRC/lib.c" "$OBJ/lib.o"
# Linked only into the guests that use them (ring3.o's 24 KiB of .bss would
# cost every other guest's emulated CPL0 boot code its clearing).
for m in pci virtio ring3; do
	cc "$SRC/$m.c" "$OBJ/$m.o"
done

# Mnemonics the KVM emulator here lacks (or that we never want), x87
# (anything starting with f), AVX (anything starting with v), and any
# MMX/SSE/AVX/AVX-512/x87 register operand.
BAD_MNEM='^(popcnt|xsave.*|xrstor.*|xgetbv|xsetbv|int3|cmpxchg16b|cmpxchg8b|movbe|crc32.*|stac|clac|rdtscp|rdpkru|wrpkru|shlx|shrx|sarx|rorx|bzhi|pdep|pext|andn|bextr|blsi|blsr|blsmsk|lzcnt|tzcnt|endbr32|endbr64|rdrand|rdseed|lfence|mfence|sfence|prefetch.*|clflush.*|movnti|emms|ldmxcsr|stmxcsr|fxsave.*|fxrstor.*|f.*|v.*)$'
BAD_REG='%([xyz]mm[0-9]+|mm[0-7]|st(\([0-7]\))?|k[0-7])\b'

# check ELF NAME ALLOWED: disassemble each code section in its own mode and
# reject forbidden instructions; ALLOWED is a mnemonic allowed exactly once.
check() {
	elf=$1 name=$2 allowed=$3
	dis=$OBJ/$name.dis
	{
		$OBJDUMP -d -M att -j .text32 -m i386 "$elf"
		$OBJDUMP -d -M att -j .text "$elf"
		if $OBJDUMP -h "$elf" | grep -q ' \.trampoline '; then
			$OBJDUMP -d -M att -j .trampoline -m i8086 "$elf"
		fi
	} > "$dis"
	# instruction lines: "addr:<TAB>bytes<TAB>mnemonic operands"
	awk -F'\t' 'NF >= 3 { print $3 }' "$dis" | sed 's/^ *//' > "$dis.insn"
	[ -s "$dis.insn" ] || { echo "build.sh: $name: empty disassembly" >&2; exit 1; }
	bad=$(awk '{ m = $1; if (m == "lock" || m ~ /^rep/ || m ~ /^(data16|addr32|cs|ds|es|ss)$/) m = $2; print m }' "$dis.insn" |
	      grep -E "$BAD_MNEM" || true)
	nallowed=0
	if [ -n "$allowed" ]; then
		nallowed=$(printf '%s\n' "$bad" | grep -cx "$allowed" || true)
		bad=$(printf '%s\n' "$bad" | grep -vx "$allowed" || true)
	fi
	regs=$(grep -E "$BAD_REG" "$dis.insn" || true)
	if [ -n "$bad" ] || [ -n "$regs" ]; then
		echo "build.sh: $name: forbidden instructions:" >&2
		printf '%s\n%s\n' "$bad" "$regs" | sed '/^$/d; s/^/  /' >&2
		exit 1
	fi
	if [ -n "$allowed" ] && [ "$nallowed" != 1 ]; then
		echo "build.sh: $name: expected exactly one $allowed, found $nallowed" >&2
		exit 1
	fi
}

for g in hello reset spin badinsn echo bench_boot bench_exits blk net idle acpi; do
	cc "$SRC/$g.c" "$OBJ/$g.o"
	extra=
	case $g in
	hello) extra=$OBJ/ap.o ;;
	blk) extra="$OBJ/pci.o $OBJ/virtio.o" ;;
	net) extra="$OBJ/pci.o $OBJ/virtio.o $OBJ/ring3.o" ;;
	bench_exits) extra=$OBJ/ring3.o ;;
	esac
	$LD $LDFLAGS -T "$SRC/link.ld" -o "$OUT/$g.elf" "$OBJ/start.o" \
		"$OBJ/lib.o" $extra "$OBJ/$g.o"
	allowed=
	[ $g = badinsn ] && allowed=xrstor
	check "$OUT/$g.elf" $g "$allowed"
	# The PVH note must be there and the image must load at 1 MiB.
	readelf -n "$OUT/$g.elf" | grep -q 'Xen.*0x00000012' || {
		echo "build.sh: $g.elf: no Xen PVH note (type 0x12)" >&2; exit 1; }
	readelf -lW "$OUT/$g.elf" | awk '$1 == "LOAD" && $4 != "0x0000000000100000" { bad = 1 } END { exit bad }' || {
		echo "build.sh: $g.elf: PT_LOAD not at physical 1 MiB" >&2; exit 1; }
done
echo "built in $OUT: hello reset spin badinsn echo bench_boot bench_exits blk net idle acpi"
