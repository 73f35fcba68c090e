/*
 * badinsn.c - prints a line, then executes xrstor with CR4.OSXSAVE clear.
 * On a host with hardware virtualization that is #UD; with the null IDT
 * start.S loads it becomes a triple fault (shutdown).  On the nested KVM
 * that emulates CPL0 code, xrstor ends the guest with an emulation failure.
 * Either way the VMM must report a crash.
 */
#include "lib.h"

static u8 xsave_area[1024] __attribute__((aligned(64)));

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	puts("VMD-TEST badinsn\n");
	__asm__ volatile("xrstor %0" : : "m"(xsave_area), "a"(0), "d"(0) : "memory");
	puts("VMD-TEST error: badinsn survived xrstor\n");
	poweroff();
}
