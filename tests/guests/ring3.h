/* ring3.h - switch a test guest to ring 3 (see README.md, "CPL3"). */
#ifndef GUEST_RING3_H
#define GUEST_RING3_H

/*
 * The nested KVM this project is tested on emulates CPL0 code (~1M
 * instructions/s) but runs CPL3 code natively.  Sets the U bit in the
 * identity page tables, loads a GDT with ring-3 segments and a TSS whose
 * I/O permission bitmap allows every port, sets IOPL=3 and irets to
 * `user_main` at CPL3 on a 16 KiB stack of its own, interrupts disabled.
 */
void enter_ring3(void (*user_main)(void)) __attribute__((noreturn));

#endif
