/* reset.c - prints a line, then resets the machine through the i8042. */
#include "lib.h"

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	puts("VMD-TEST reset\n");
	reset();
	io_delay(100000);
	puts("VMD-TEST reset failed\n");
	poweroff();
}
