/*
 * start.S - common PVH entry for the vmd test guests.
 *
 * The ELF is 64-bit (like Linux's vmlinux) but entered through the Xen PVH
 * note in 32-bit protected mode: flat segments, paging off, interrupts off,
 * %ebx = physical address of struct hvm_start_info.  We load our own GDT and
 * a null IDT (so any exception becomes a triple fault), switch to long mode
 * with static identity page tables covering the low 4 GiB (2 MiB pages), and
 * call guest_main(start_info_paddr).  If it returns, we power off.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

	/* PVH entry note: name "Xen", type 18, desc = entry (8 bytes, as
	 * Linux writes it in a 64-bit ELF; the low 4 bytes are the 32-bit
	 * physical entry address). */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 4				/* namesz */
	.long 8				/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.p2align 2
	.quad pvh_start
	.p2align 2

	.section .text32, "ax", @progbits
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	movl	%ebx, %esi		/* keep start info pointer */
	lgdt	gdt_desc
	lidt	idt_null
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$stack_top, %esp
	/* zero .bss (small; the stack lives in .stack, not zeroed) */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb
	/* long mode: PAE, CR3, EFER.LME, CR0.PG */
	movl	%cr4, %eax
	orl	$0x20, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xC0000080, %ecx
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax
	movl	%eax, %cr0
	ljmp	$0x08, $long_start

	.text
	.code64
long_start:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movq	$stack_top, %rsp
	movl	%esi, %edi		/* guest_main(start_info paddr) */
	call	guest_main
	call	poweroff
1:	cli
	hlt
	jmp	1b

	.data
	.p2align 3
gdt:
	.quad	0			/* null */
	.quad	0x00af9b000000ffff	/* 0x08: 64-bit code, accessed */
	.quad	0x00cf93000000ffff	/* 0x10: flat data, accessed */
	.quad	0x00cf9b000000ffff	/* 0x18: 32-bit code (unused) */
gdt_end:
	.p2align 3
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.p2align 3
idt_null:
	.word	0
	.quad	0

	/* Identity map of 0-4 GiB with 2 MiB pages; the top GiB (LAPIC,
	 * IOAPIC, other MMIO) is uncached (PCD|PWT). */
	.section .data.pagetables, "aw", @progbits
	.p2align 12
pml4:
	.quad	pdpt + 0x3
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + 0x3
	.quad	pd + 0x1000 + 0x3
	.quad	pd + 0x2000 + 0x3
	.quad	pd + 0x3000 + 0x3
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	2048
	.quad	(i << 21) | 0x83 | ((i >= 1536) & 0x18)
	.set	i, i + 1
	.endr

	.section .note.GNU-stack, "", @progbits
