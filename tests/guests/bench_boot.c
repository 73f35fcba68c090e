/*
 * bench_boot.c - boot-time benchmark guest (bench/run.sh).
 *
 * Prints "VMD-BENCH boot" as its very first serial output (its first byte,
 * 'V', is the "first guest output" the benchmark times), then powers off;
 * with "idle" in the command line it prints "VMD-BENCH idle" instead and
 * halts forever with interrupts off (an idle VM for the memory figures).
 * Runs a few hundred CPL0 instructions in all.
 */
#include "lib.h"

static int has_idle(const char *s)
{
	for (; *s; s++)
		if (s[0] == 'i' && s[1] == 'd' && s[2] == 'l' && s[3] == 'e')
			return 1;
	return 0;
}

void guest_main(u32 start_info)
{
	const struct hvm_start_info *si = (const void *)(usize)start_info;

	serial_init();
	puts("VMD-BENCH boot\n");
	if (si->magic == HVM_START_MAGIC && si->cmdline_paddr &&
	    has_idle((const char *)(usize)si->cmdline_paddr)) {
		puts("VMD-BENCH idle\n");
		halt_forever();
	}
	poweroff();
}
