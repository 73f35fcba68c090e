/* lib.c - serial output, power control and the few libc bits gcc may call. */
#include "lib.h"

void io_delay(u32 n)
{
	while (n--)
		(void)inb(COM1 + 5);
}

void serial_init(void)
{
	outb(COM1 + 1, 0x00);		/* IER: no interrupts */
	outb(COM1 + 3, 0x03);		/* LCR: 8N1, DLAB off */
}

void putc(char c)
{
	/* Wait (bounded) for THR empty: LSR bit 5. */
	for (u32 i = 0; i < 100000; i++)
		if (inb(COM1 + 5) & 0x20)
			break;
	outb(COM1, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void putn(const char *s, usize n)
{
	while (n--)
		putc(*s++);
}

void put_hex(u64 v)
{
	char buf[16];
	int n = 0;

	puts("0x");
	do {
		u32 d = (u32)(v & 0xf);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v >>= 4;
	} while (v);
	while (n)
		putc(buf[--n]);
}

void put_dec(u64 v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		putc(buf[--n]);
}

void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

void poweroff(void)
{
	/* vmd: ACPI PM1a_CNT, SLP_TYP=5 (S5) | SLP_EN. */
	outw(PM1A_CNT, SLP_S5);
	/* Still here: QEMU's PIIX4/ICH9 PM (also at 0x604) powers off on
	 * SLP_TYP=0 instead. */
	io_delay(1000);
	outw(PM1A_CNT, 1 << 13);
	halt_forever();
}

void fail(const char *what)
{
	puts("VMD-TEST error: ");
	puts(what);
	putc('\n');
	poweroff();
}

void reset(void)
{
	outb(I8042_CMD, 0xFE);		/* i8042: pulse the CPU reset line */
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memset(void *d, int c, usize n)
{
	u8 *dp = d;

	while (n--)
		*dp++ = (u8)c;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *ap = a, *bp = b;

	for (; n; n--, ap++, bp++)
		if (*ap != *bp)
			return *ap < *bp ? -1 : 1;
	return 0;
}
