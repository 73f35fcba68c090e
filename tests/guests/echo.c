/* echo.c - an interactive console guest: prints a ready line, then echoes
 * every byte typed on COM1; 'q' prints a goodbye line and powers off. It
 * proves console input reaches the guest, and that a paused guest does
 * not run (it answers nothing until unpaused). */
#include "lib.h"

#define COM1_LSR	(COM1 + 5)
#define LSR_DATA_READY	0x01

void guest_main(u32 start_info)
{
	(void)start_info;
	serial_init();
	puts("VMD-TEST echo ready\n");
	for (;;) {
		while (!(inb(COM1_LSR) & LSR_DATA_READY))
			;
		char c = (char)inb(COM1);
		if (c == 'q') {
			puts("\nVMD-TEST echo bye\n");
			poweroff();
		}
		putc(c);
	}
}
