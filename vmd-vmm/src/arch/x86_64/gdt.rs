//! The boot GDT shared by every boot path, and the identity-mapped page
//! tables for the 64-bit Linux entry.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::BootError;
use crate::arch::x86_64::layout::{GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Selectors into [`GDT`]. Linux's 64-bit boot protocol wants code at 0x10
/// and data at 0x18 (its __BOOT_CS/__BOOT_DS); PVH leaves them open.
pub const CODE32_SEL: u16 = 0x08;
pub const CODE64_SEL: u16 = 0x10;
pub const DATA_SEL: u16 = 0x18;
pub const TSS_SEL: u16 = 0x20;

/// Descriptor flags (access byte plus the G/DB/L nibble).
const CODE32: u16 = 0xc09b; // G, D/B, present, code exec/read, accessed
const CODE64: u16 = 0xa09b; // G, L, present, code exec/read, accessed
const DATA: u16 = 0xc093; // G, D/B, present, data read/write, accessed
const TSS: u16 = 0x008b; // present, busy 32/64-bit TSS (what VM entry wants)

/// The boot GDT: 4 GiB flat segments, plus a TSS KVM insists on.
pub const GDT: [u64; 5] = [
    0,
    descriptor(CODE32, 0, 0xfffff),
    descriptor(CODE64, 0, 0xfffff),
    descriptor(DATA, 0, 0xfffff),
    descriptor(TSS, 0, 0x67),
];

const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of the descriptor at `selector`.
pub fn segment(selector: u16) -> kvm_segment {
    let d = GDT[usize::from(selector >> 3)];
    let base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let g = ((d >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((d >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, d) in GDT.iter().enumerate() {
        let addr = GuestAddress(GDT_ADDR + 8 * i as u64);
        mem.write_obj(*d, addr)
            .map_err(|e| BootError::Write("GDT", e))?;
    }
    Ok(())
}

/// GDT limit as loaded into GDTR.
pub fn gdt_limit() -> u16 {
    (std::mem::size_of_val(&GDT) - 1) as u16
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for Linux's
/// 64-bit entry, which builds its own tables at once.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| BootError::Write("page tables", e))
    };
    w(PDPT_ADDR | PRESENT_RW, PML4_ADDR)?;
    w(PD_ADDR | PRESENT_RW, PDPT_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | PRESENT_RW | HUGE, PD_ADDR + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code64_segment() {
        let s = segment(CODE64_SEL);
        assert_eq!(
            (s.base, s.limit, s.type_, s.l, s.db, s.g),
            (0, 0xffff_ffff, 0xb, 1, 0, 1)
        );
        assert_eq!((s.present, s.s, s.dpl, s.unusable), (1, 1, 0, 0));
    }

    #[test]
    fn flat_code32_and_data() {
        let c = segment(CODE32_SEL);
        assert_eq!((c.limit, c.db, c.l, c.type_), (0xffff_ffff, 1, 0, 0xb));
        let d = segment(DATA_SEL);
        assert_eq!((d.limit, d.db, d.type_, d.s), (0xffff_ffff, 1, 3, 1));
    }

    #[test]
    fn tss_is_busy_system_segment() {
        let t = segment(TSS_SEL);
        assert_eq!(
            (t.limit, t.type_, t.s, t.present, t.g),
            (0x67, 0xb, 0, 1, 0)
        );
    }
}
