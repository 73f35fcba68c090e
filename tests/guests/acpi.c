/* acpi.c - waits for the ACPI power button (vmctl stop) and powers off.
 * Enables PWRBTN_EN, polls PM1a_STS with interrupts off (the SCI is
 * raised too, but polling needs no IOAPIC or IDT set up), acknowledges
 * the event (write 1 to clear) and enters S5 through PM1a_CNT. */
#include "lib.h"

#define PM1A_STS	0x600
#define PM1A_EN		0x602
#define PWRBTN		(1 << 8)

static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	__asm__ volatile("cli");
	outw(PM1A_EN, PWRBTN);
	if (!(inw(PM1A_EN) & PWRBTN))
		fail("PWRBTN_EN did not stick");
	puts("VMD-TEST acpi ready\n");
	while (!(inw(PM1A_STS) & PWRBTN))
		io_delay(1000);
	puts("VMD-TEST acpi power button\n");
	outw(PM1A_STS, PWRBTN);
	if (inw(PM1A_STS) & PWRBTN)
		fail("PWRBTN_STS did not clear");
	poweroff();
}
