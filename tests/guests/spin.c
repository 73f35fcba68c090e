/* spin.c - prints a line, then spins forever with interrupts off. */
#include "lib.h"

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	puts("VMD-TEST spin\n");
	__asm__ volatile("cli\n1: jmp 1b");
	__builtin_unreachable();
}
