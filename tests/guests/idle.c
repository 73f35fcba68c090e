/* idle.c - prints a line, then halts with interrupts off: a VM that runs
 * but costs the host no CPU (load and leak tests start many of them). */
#include "lib.h"

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	puts("VMD-TEST idle\n");
	halt_forever();
}
