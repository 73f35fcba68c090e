//! Every guest physical address and I/O port the VM process uses, in one
//! place. Test guests rely on the low-memory layout below, so changing an
//! address here changes the guest ABI.

// ---- Low memory (first MiB) ----

/// GDT used by every boot path: null, 32-bit code, 64-bit code, data, TSS.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`; its e820-style memory map follows it directly.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH memory map entries, right after the 56-byte start info.
pub const PVH_MEMMAP: u64 = PVH_START_INFO + 0x38;
/// Most memory map entries we ever write (we write at most 5).
pub const PVH_MEMMAP_MAX: usize = 16;
/// PVH module list (the initrd is module 0), well past the memory map.
pub const PVH_MODLIST: u64 = 0x6800;
/// Linux zero page (`struct boot_params`) for the 64-bit Linux entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry (stack in 0x8000-0x8fff).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, and one
/// page directory of 2 MiB pages mapping the first 1 GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
// 0x10000-0x1ffff is left to the guest (test guests put an AP trampoline
// there); we never write it.
/// Kernel command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line including its NUL.
pub const CMDLINE_MAX: usize = 2048;
/// Extended BIOS data area: holds the MP floating pointer and, when it
/// fits, the MP configuration table. Reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory; 0xa0000-0xfffff is the legacy VGA/ROM hole.
pub const EBDA_END: u64 = 0xa0000;
/// ACPI tables, in the lower half of the BIOS area that Linux scans for
/// the RSDP (0xe0000-0xfffff), so they stay clear of the MP table, which
/// may use 0xf0000 onward. Reserved in e820 together with the ROM area.
pub const ACPI_START: u64 = 0xe0000;
/// RSDP (36 bytes): on a 16-byte boundary, as the scan requires.
pub const ACPI_RSDP: u64 = ACPI_START;
/// XSDT: header and two 8-byte pointers (FADT, MADT).
pub const ACPI_XSDT: u64 = ACPI_START + 0x40;
/// FACS (64 bytes): must be 64-byte aligned.
pub const ACPI_FACS: u64 = ACPI_START + 0x80;
/// FADT (276 bytes, revision 6).
pub const ACPI_FADT: u64 = ACPI_START + 0x100;
/// DSDT: `\_S5` and the PCI root bridge with its _CRS and _PRT
/// (about 0x220 bytes), room to grow to 0x500.
pub const ACPI_DSDT: u64 = ACPI_START + 0x300;
/// MADT last: its length grows with the vCPU count (8 bytes per vCPU).
pub const ACPI_MADT: u64 = ACPI_START + 0x800;
/// End of the ACPI area, where the BIOS ROM area starts.
pub const ACPI_END: u64 = BIOS_ROM_START;
/// The BIOS ROM area (reserved in e820). The MP configuration table goes
/// here when it is too large for the EBDA (many vCPUs).
pub const BIOS_ROM_START: u64 = 0xf0000;
pub const BIOS_ROM_END: u64 = 0x10_0000;
/// Where the kernel is loaded (1 MiB), and the start of "high" memory.
pub const KERNEL_START: u64 = 0x10_0000;

// ---- Above the first MiB ----

/// RAM ends here below 4 GiB; the rest of guest memory goes above 4 GiB.
/// The hole in between is for MMIO (IOAPIC, LAPIC, later PCI).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address above the MMIO gap.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// KVM's identity-map page for real-mode emulation (one page) and the TSS
/// it needs (three pages), both inside the MMIO gap, out of RAM's way.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
pub const KVM_TSS_ADDR: u64 = 0xfeff_d000;
/// PCI memory BARs are allocated from this window (inside the MMIO gap,
/// clear of 0xd000_0000, which benchmarks use as an unclaimed address, and
/// of the IOAPIC/LAPIC/KVM pages at 0xfec0_0000 and up). The ACPI PCI root
/// bridge's _CRS hands the same window to the guest.
pub const PCI_MMIO_START: u64 = 0xe000_0000;
pub const PCI_MMIO_END: u64 = 0xfc00_0000;
/// The in-kernel IOAPIC and local APICs (architectural defaults).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

// ---- I/O ports ----

/// POST / I/O delay port: Linux writes it for tiny delays.
pub const PORT_POST: u16 = 0x80;
/// i8042 keyboard controller: data and command/status.
pub const PORT_I8042_DATA: u16 = 0x60;
pub const PORT_I8042_CMD: u16 = 0x64;
/// CMOS/RTC index and data.
pub const PORT_CMOS: u16 = 0x70;
/// 16550 UARTs. Only COM1 exists; the others read as absent.
pub const PORT_COM1: u16 = 0x3f8;
pub const PORT_COM2: u16 = 0x2f8;
pub const PORT_COM3: u16 = 0x3e8;
pub const PORT_COM4: u16 = 0x2e8;
/// ACPI PM1a event block (32 bits: 16-bit status, then 16-bit enable).
pub const PORT_PM1A_EVT: u16 = 0x600;
pub const PM1A_EVT_LEN: u8 = 4;
/// ACPI PM1a control block (16 bits; SCI_EN/SLP_TYP/SLP_EN).
pub const PORT_PM1A_CNT: u16 = 0x604;
pub const PM1A_CNT_LEN: u8 = 2;
/// fw_cfg (selector, data, DMA address), for firmware boot only.
pub const PORT_FW_CFG: u16 = 0x510;
/// Firmware debug output (QEMU's debugcon port), for firmware boot only.
pub const PORT_DEBUGCON: u16 = 0x402;
/// PCI reset control register.
pub const PORT_RESET_CTRL: u16 = 0xcf9;

/// PCI configuration mechanism #1: address (dword at 0xcf8) and data
/// (0xcfc-0xcff). Byte accesses to 0xcf9 stay the reset control register.
pub const PORT_PCI_CONFIG_ADDRESS: u16 = 0xcf8;
pub const PORT_PCI_CONFIG_DATA: u16 = 0xcfc;

/// INTx: PCI device `n` (slot n, pin A) raises IOAPIC input
/// `PCI_INTX_GSI_BASE + (n - 1) % PCI_INTX_GSI_COUNT` (GSIs 16-23, shared
/// beyond 8 devices), level-triggered, as the DSDT's _PRT says.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;
/// The IOAPIC has 24 inputs (GSIs 0-23); MSI-X vectors get GSIs from here.
pub const IOAPIC_PINS: u32 = 24;
/// Legacy IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Legacy IRQ (and GSI) of the ACPI SCI, as the FADT and MADT say.
pub const SCI_IRQ: u8 = 9;
