/* lib.h - tiny runtime for the vmd test guests (64-bit, freestanding). */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define COM1		0x3F8
#define PM1A_CNT	0x604		/* vmd's ACPI PM1a control port */
#define SLP_S5		((5 << 10) | (1 << 13))
#define I8042_CMD	0x64

#define HVM_START_MAGIC		0x336ec578

/* The PVH start info (%ebx at entry, passed to guest_main). */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;	/* version >= 1 */
	u32 memmap_entries;	/* version >= 1 */
	u32 reserved;
};

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static inline void mmio_write32(u64 addr, u32 v)
{
	*(volatile u32 *)addr = v;
}

/* A delay measured in port reads (each one is a VM exit, so the time per
 * iteration is roughly the same whether CPL0 code is emulated or not). */
void io_delay(u32 n);

void serial_init(void);
void putc(char c);
void puts(const char *s);		/* no newline added */
void putn(const char *s, usize n);
void put_hex(u64 v);			/* "0x..." lowercase, no padding */
void put_dec(u64 v);
void fail(const char *what) __attribute__((noreturn));
void poweroff(void) __attribute__((noreturn));
void reset(void);
void halt_forever(void) __attribute__((noreturn));

void *memcpy(void *d, const void *s, usize n);
void *memset(void *d, int c, usize n);
int memcmp(const void *a, const void *b, usize n);

#endif
