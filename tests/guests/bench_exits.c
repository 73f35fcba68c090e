/*
 * bench_exits.c - VM-exit rate benchmark guest (bench/run.sh).
 *
 * The nested KVM this project is tested on emulates CPL0 code (~1M
 * instructions/s) but runs CPL3 code natively, so the hot loops run in
 * ring 3 with IOPL=3: guest_main calls enter_ring3 (ring3.c), which sets
 * the U bit in the identity page tables, loads a GDT with ring-3 segments
 * and irets to user_main.  Each phase then does N accesses that all exit to
 * the VMM, between two marker lines:
 *
 *   VMD-BENCH exits n=N
 *   VMD-BENCH pio-out begin     ... N x outb to port 0x2e0 (unclaimed)
 *   VMD-BENCH pio-out end
 *   VMD-BENCH pio-in begin      ... N x inb from port 0x2e0
 *   VMD-BENCH pio-in end
 *   VMD-BENCH mmio-write begin  ... N x 32-bit store to 0xd0000000 (unclaimed)
 *   VMD-BENCH mmio-write end
 *   VMD-BENCH mmio-read begin   ... N x 32-bit load from 0xd0000000
 *   VMD-BENCH mmio-read end
 *   VMD-BENCH exits done
 *
 * The host times the lines as they arrive.  N comes from "n=DECIMAL" on the
 * command line (default 100000).  Then it powers off (from ring 3: the
 * writes to 0x604 are allowed with IOPL=3; if they do not end the VM, the
 * final hlt at CPL3 faults, and with a null IDT that is a triple fault).
 */
#include "lib.h"
#include "ring3.h"

#define BENCH_PORT	0x2e0
#define BENCH_MMIO	0xd0000000UL

static u64 n_iter = 100000;

static void parse_n(const char *s)
{
	for (; *s; s++) {
		if (s[0] == 'n' && s[1] == '=' && s[2] >= '0' && s[2] <= '9') {
			u64 v = 0;
			for (s += 2; *s >= '0' && *s <= '9'; s++)
				v = v * 10 + (u64)(*s - '0');
			if (v)
				n_iter = v;
			return;
		}
	}
}

static void phase(const char *name, int kind)
{
	u64 n = n_iter;

	puts("VMD-BENCH ");
	puts(name);
	puts(" begin\n");
	switch (kind) {
	case 0:
		while (n--)
			outb(BENCH_PORT, 0);
		break;
	case 1:
		while (n--)
			(void)inb(BENCH_PORT);
		break;
	case 2:
		while (n--)
			mmio_write32(BENCH_MMIO, 0);
		break;
	default:
		while (n--)
			(void)mmio_read32(BENCH_MMIO);
		break;
	}
	puts("VMD-BENCH ");
	puts(name);
	puts(" end\n");
}

static void __attribute__((noreturn, used)) user_main(void)
{
	puts("VMD-BENCH exits n=");
	put_dec(n_iter);
	putc('\n');
	phase("pio-out", 0);
	phase("pio-in", 1);
	phase("mmio-write", 2);
	phase("mmio-read", 3);
	puts("VMD-BENCH exits done\n");
	poweroff();
}

void guest_main(u32 start_info)
{
	const struct hvm_start_info *si = (const void *)(usize)start_info;
	serial_init();
	if (si->magic == HVM_START_MAGIC && si->cmdline_paddr)
		parse_n((const char *)(usize)si->cmdline_paddr);

	enter_ring3(user_main);
}
