//! An Intel MultiProcessor Specification 1.4 table, so a guest without
//! ACPI finds its CPUs, the IOAPIC and how ISA interrupts are wired.
//!
//! The floating pointer sits at the start of the EBDA, where guests scan
//! for it. The configuration table follows it when it fits in the EBDA's
//! 1 KiB, and otherwise goes to the (reserved) BIOS ROM area.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::arch::x86_64::layout::{
    BIOS_ROM_END, BIOS_ROM_START, EBDA_END, EBDA_START, IOAPIC_ADDR, LAPIC_ADDR,
};

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("MP table for {0} vCPUs does not fit in the BIOS area")]
    TooLarge(u32),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const SPEC_REV_1_4: u8 = 4;

// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

// Interrupt types.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// A local APIC version of an integrated APIC (what KVM's LAPIC reports).
const LAPIC_VERSION: u8 = 0x14;
/// The IOAPIC version KVM's in-kernel IOAPIC reports.
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
/// Family 6 processor signature and the FPU + APIC feature bits. Guests
/// take the real values from CPUID; these only need to be plausible.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
/// Polarity and trigger mode "conform to the bus" (ISA: edge, high).
const FLAGS_CONFORMING: u16 = 0;
/// ISA IRQs routed to the IOAPIC.
const ISA_IRQS: u8 = 16;
const ISA_BUS_ID: u8 = 0;
/// A local interrupt entry for every local APIC.
const ALL_LAPICS: u8 = 0xff;

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    length_16: u8,
    spec_rev: u8,
    checksum: u8,
    /// 0: a configuration table is present (no default configuration).
    feature1: u8,
    /// Bit 7 clear: virtual wire mode, no IMCR.
    feature2: u8,
    feature3_5: [u8; 3],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct ConfigHeader {
    signature: [u8; 4],
    base_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    ext_length: u16,
    ext_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Processor {
    kind: u8,
    lapic_id: u8,
    lapic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Bus {
    kind: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct IoApic {
    kind: u8,
    id: u8,
    version: u8,
    flags: u8,
    addr: u32,
}

/// Both interrupt entry kinds (I/O and local) share this layout.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Interrupt {
    kind: u8,
    int_type: u8,
    flags: u16,
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

/// Makes the bytes of `data` sum to zero mod 256.
fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: one past the last CPU's APIC id.
pub fn ioapic_id(vcpus: u32) -> u8 {
    vcpus as u8
}

/// The configuration table (header and entries) for `vcpus` CPUs, as it
/// will be written at any address.
fn config_table(vcpus: u32) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for id in 0..vcpus {
        let bsp = if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        push(
            Processor {
                kind: ENTRY_PROCESSOR,
                lapic_id: id as u8,
                lapic_version: LAPIC_VERSION,
                flags: CPU_ENABLED | bsp,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                reserved: [0; 2],
            }
            .as_bytes(),
        );
    }
    push(
        Bus {
            kind: ENTRY_BUS,
            bus_id: ISA_BUS_ID,
            bus_type: *b"ISA   ",
        }
        .as_bytes(),
    );
    let ioapic = ioapic_id(vcpus);
    push(
        IoApic {
            kind: ENTRY_IOAPIC,
            id: ioapic,
            version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            addr: IOAPIC_ADDR,
        }
        .as_bytes(),
    );
    // KVM's default routing wires ISA IRQ n to IOAPIC pin n.
    for irq in 0..ISA_IRQS {
        push(
            Interrupt {
                kind: ENTRY_IO_INT,
                int_type: INT_VECTORED,
                flags: FLAGS_CONFORMING,
                src_bus: ISA_BUS_ID,
                src_irq: irq,
                dst_apic: ioapic,
                dst_pin: irq,
            }
            .as_bytes(),
        );
    }
    // The legacy PIC feeds the BSP's LINT0; NMIs reach every LINT1.
    for (int_type, dst_apic, pin) in [(INT_EXTINT, 0, 0), (INT_NMI, ALL_LAPICS, 1)] {
        push(
            Interrupt {
                kind: ENTRY_LOCAL_INT,
                int_type,
                flags: FLAGS_CONFORMING,
                src_bus: ISA_BUS_ID,
                src_irq: 0,
                dst_apic,
                dst_pin: pin,
            }
            .as_bytes(),
        );
    }

    let mut header = ConfigHeader {
        signature: *b"PCMP",
        base_length: (std::mem::size_of::<ConfigHeader>() + entries.len()) as u16,
        spec_rev: SPEC_REV_1_4,
        oem_id: *b"OPENBSD ",
        product_id: *b"VMD         ",
        entry_count: count,
        lapic_addr: LAPIC_ADDR,
        ..Default::default()
    };
    let mut table = header.as_bytes().to_vec();
    table.extend_from_slice(&entries);
    header.checksum = checksum(&table);
    table[..std::mem::size_of::<ConfigHeader>()].copy_from_slice(header.as_bytes());
    table
}

/// Writes the MP table for `vcpus` CPUs.
pub fn write(mem: &GuestMemoryMmap, vcpus: u32) -> Result<(), MpTableError> {
    let table = config_table(vcpus);
    let fp_len = std::mem::size_of::<FloatingPointer>() as u64;
    let len = table.len() as u64;
    let table_addr = if EBDA_START + fp_len + len <= EBDA_END {
        EBDA_START + fp_len
    } else if BIOS_ROM_START + len <= BIOS_ROM_END {
        BIOS_ROM_START
    } else {
        return Err(MpTableError::TooLarge(vcpus));
    };
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(MpTableError::Write)?;

    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        config_table: table_addr as u32,
        length_16: 1,
        spec_rev: SPEC_REV_1_4,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_bytes());
    mem.write_slice(fp.as_bytes(), GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<FloatingPointer>(), 16);
        assert_eq!(std::mem::size_of::<ConfigHeader>(), 44);
        assert_eq!(std::mem::size_of::<Processor>(), 20);
        assert_eq!(std::mem::size_of::<Bus>(), 8);
        assert_eq!(std::mem::size_of::<IoApic>(), 8);
        assert_eq!(std::mem::size_of::<Interrupt>(), 8);
    }

    fn read_table(vcpus: u32) -> (Vec<u8>, u64) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write(&mem, vcpus).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let addr = u64::from(u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]));
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        (table, addr)
    }

    #[test]
    fn small_table_lives_in_the_ebda_and_sums_to_zero() {
        let (t, addr) = read_table(2);
        assert_eq!(addr, EBDA_START + 16);
        assert_eq!(&t[..4], b"PCMP");
        assert_eq!(sum(&t), 0);
        // 2 CPUs + bus + IOAPIC + 16 I/O interrupts + 2 local interrupts.
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 2 + 1 + 1 + 16 + 2);
        // First processor entry: APIC id 0, enabled BSP.
        assert_eq!(&t[44..48], &[ENTRY_PROCESSOR, 0, LAPIC_VERSION, 3]);
        assert_eq!(&t[64..68], &[ENTRY_PROCESSOR, 1, LAPIC_VERSION, 1]);
    }

    #[test]
    fn big_table_moves_to_the_bios_area() {
        let (t, addr) = read_table(64);
        assert_eq!(addr, BIOS_ROM_START);
        assert_eq!(sum(&t), 0);
    }
}
