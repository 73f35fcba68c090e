/*
 * ap.S - real-mode AP trampoline for hello.elf.  The BSP copies
 * [ap_tramp_start, ap_tramp_end) to 0x10000 and sends SIPI vector 0x10, so
 * the AP starts here with CS=0x1000, IP=0.  It counts itself with a locked
 * increment of ap_tramp_count (in the copy) and halts for good.
 */
	.section .trampoline, "ax", @progbits
	.code16
	.globl ap_tramp_start, ap_tramp_end, ap_tramp_count
ap_tramp_start:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lock incl (ap_tramp_count - ap_tramp_start)
1:	cli
	hlt
	jmp	1b
	.p2align 2
ap_tramp_count:
	.long	0
ap_tramp_end:
	.code64

	.section .note.GNU-stack, "", @progbits
