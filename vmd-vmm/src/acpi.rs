//! Minimal ACPI tables (ACPI 6.x), so that a guest without an MP table
//! parser still finds its CPUs and interrupt wiring (MADT), and so that
//! Linux can power off (FADT + DSDT `\_S5` → PM1a control).
//!
//! RSDP → XSDT → { FADT → { FACS, DSDT }, MADT }.
//!
//! Two ways in, one set of builders: a directly booted kernel finds the
//! tables at fixed addresses in the reserved BIOS area (see layout.rs,
//! [`write`]); firmware (SeaBIOS) gets them through fw_cfg as QEMU's
//! linker/loader files ([`loader_files`]) and places them itself.
//!
//! The tables are hand-written here rather than taken from the rust-vmm
//! `acpi_tables` crate: we need six small fixed tables, and writing them
//! directly keeps the workspace free of another dependency and its
//! vm-memory version coupling.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::arch::x86_64::layout::{
    ACPI_DSDT, ACPI_END, ACPI_FACS, ACPI_FADT, ACPI_MADT, ACPI_RSDP, ACPI_XSDT, IOAPIC_ADDR,
    LAPIC_ADDR, PCI_MMIO_END, PCI_MMIO_START, PM1A_CNT_LEN, PM1A_EVT_LEN, PORT_PM1A_CNT,
    PORT_PM1A_EVT, PORT_RESET_CTRL, SCI_IRQ,
};
use crate::arch::x86_64::mptable::ioapic_id;
use crate::devices::legacy::fw_cfg::{FwCfgError, LoaderZone, TableLoader};
use crate::devices::legacy::power::SLP_TYP_S5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("MADT for {0} vCPUs does not fit in the ACPI area")]
    TooLarge(u32),
    #[error("cannot write the {0} to guest memory: {1}")]
    Write(&'static str, vm_memory::GuestMemoryError),
    #[error("ACPI table loader: {0}")]
    Loader(#[from] FwCfgError),
}

const OEM_ID: [u8; 6] = *b"VMD   ";
const OEM_TABLE_ID: [u8; 8] = *b"VMD     ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"VMD ";
const CREATOR_REVISION: u32 = 1;

/// The common header of every system description table (ACPI 5.2.6).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct SdtHeader {
    signature: [u8; 4],
    length: u32,
    revision: u8,
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: u32,
    creator_id: [u8; 4],
    creator_revision: u32,
}

/// Root System Description Pointer, ACPI 2.0+ form (5.2.5.3).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Rsdp {
    signature: [u8; 8],
    /// Covers the first 20 bytes (the ACPI 1.0 part).
    checksum: u8,
    oem_id: [u8; 6],
    revision: u8,
    /// No RSDT: revision 2 guests use the XSDT.
    rsdt_addr: u32,
    length: u32,
    xsdt_addr: u64,
    /// Covers all 36 bytes.
    extended_checksum: u8,
    reserved: [u8; 3],
}

/// Generic Address Structure (5.2.3.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Gas {
    space_id: u8,
    bit_width: u8,
    bit_offset: u8,
    /// 0: undefined (legacy), 1: byte, 2: word, 3: dword, 4: qword.
    access_size: u8,
    address: u64,
}

const GAS_SYSTEM_IO: u8 = 1;
const ACCESS_BYTE: u8 = 1;

impl Gas {
    fn io(port: u16, bytes: u8, access_size: u8) -> Gas {
        Gas {
            space_id: GAS_SYSTEM_IO,
            bit_width: bytes * 8,
            bit_offset: 0,
            access_size,
            address: u64::from(port),
        }
    }
}

/// Fixed ACPI Description Table, revision 6 (5.2.9), 276 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Fadt {
    header: SdtHeader,
    firmware_ctrl: u32,
    dsdt: u32,
    reserved0: u8,
    preferred_pm_profile: u8,
    sci_int: u16,
    smi_cmd: u32,
    acpi_enable: u8,
    acpi_disable: u8,
    s4bios_req: u8,
    pstate_cnt: u8,
    pm1a_evt_blk: u32,
    pm1b_evt_blk: u32,
    pm1a_cnt_blk: u32,
    pm1b_cnt_blk: u32,
    pm2_cnt_blk: u32,
    pm_tmr_blk: u32,
    gpe0_blk: u32,
    gpe1_blk: u32,
    pm1_evt_len: u8,
    pm1_cnt_len: u8,
    pm2_cnt_len: u8,
    pm_tmr_len: u8,
    gpe0_blk_len: u8,
    gpe1_blk_len: u8,
    gpe1_base: u8,
    cst_cnt: u8,
    p_lvl2_lat: u16,
    p_lvl3_lat: u16,
    flush_size: u16,
    flush_stride: u16,
    duty_offset: u8,
    duty_width: u8,
    day_alrm: u8,
    mon_alrm: u8,
    century: u8,
    iapc_boot_arch: u16,
    reserved1: u8,
    flags: u32,
    reset_reg: Gas,
    reset_value: u8,
    arm_boot_arch: u16,
    minor_version: u8,
    x_firmware_ctrl: u64,
    x_dsdt: u64,
    x_pm1a_evt_blk: Gas,
    x_pm1b_evt_blk: Gas,
    x_pm1a_cnt_blk: Gas,
    x_pm1b_cnt_blk: Gas,
    x_pm2_cnt_blk: Gas,
    x_pm_tmr_blk: Gas,
    x_gpe0_blk: Gas,
    x_gpe1_blk: Gas,
    sleep_control_reg: Gas,
    sleep_status_reg: Gas,
    hypervisor_vendor_id: u64,
}

const FADT_REVISION: u8 = 6;
/// "Unspecified": we are neither a desktop nor a server in particular.
const PM_PROFILE_UNSPECIFIED: u8 = 0;
/// CMOS index of the century byte (devices/legacy/cmos.rs keeps it there).
const CMOS_CENTURY: u8 = 0x32;

// FADT flags (5.2.9, table 5.10).
const FADT_WBINVD: u32 = 1 << 0;
/// C1 (HLT) works on every CPU.
const FADT_PROC_C1: u32 = 1 << 2;
/// No fixed-feature sleep button (the power button stays a fixed
/// feature, PWR_BUTTON clear, for the PM1 event block).
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// The RTC cannot wake the machine: there is no RTC_STS to look at.
const FADT_FIX_RTC: u32 = 1 << 6;
/// RESET_REG below is valid.
const FADT_RESET_REG_SUP: u32 = 1 << 10;

// IA-PC boot architecture flags (5.2.9.3).
/// ISA devices exist (COM1, the PIT, the PIC, CMOS).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
// Bit 1 (8042) stays clear: our i8042 only resets the machine and has no
// keyboard; with it clear Linux skips probing it (reset still works).
/// No VGA: Linux must not poke the VGA registers.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Writing this to the reset register (0xCF9) resets the machine: bit 2
/// (reset CPU) with bit 1 (hard reset), as devices/legacy/i8042.rs expects.
const RESET_VALUE: u8 = 0x06;

/// Firmware ACPI Control Structure (5.2.10): only for the global lock;
/// no firmware waking vector (no S3).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Facs {
    signature: [u8; 4],
    length: u32,
    hardware_signature: u32,
    firmware_waking_vector: u32,
    global_lock: u32,
    flags: u32,
    x_firmware_waking_vector: u64,
    version: u8,
    reserved0: [u8; 3],
    ospm_flags: u32,
    reserved1: [u8; 24],
}

const FACS_VERSION: u8 = 2;

// MADT (5.2.12).
/// The machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: active high (bits 1:0 = 01), level (bits 3:2 = 11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000d;
/// MPS INTI flags: conforming to the bus.
const INTI_CONFORMING: u16 = 0;
/// A local APIC NMI entry for every processor.
const ALL_PROCESSORS: u8 = 0xff;
const ISA_BUS: u8 = 0;

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct MadtLocalApic {
    kind: u8,
    length: u8,
    processor_uid: u8,
    apic_id: u8,
    flags: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct MadtIoApic {
    kind: u8,
    length: u8,
    id: u8,
    reserved: u8,
    address: u32,
    gsi_base: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct MadtIntSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct MadtLocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

// The fixed-size tables fit their slots in layout.rs; the RSDP sits on
// the 16-byte boundary the scan needs and the FACS is 64-byte aligned.
const _: () = {
    assert!(ACPI_RSDP.is_multiple_of(16) && ACPI_FACS.is_multiple_of(64));
    assert!(ACPI_RSDP + std::mem::size_of::<Rsdp>() as u64 <= ACPI_XSDT);
    assert!(ACPI_XSDT + 36 + 2 * 8 <= ACPI_FACS);
    assert!(ACPI_FACS + std::mem::size_of::<Facs>() as u64 <= ACPI_FADT);
    assert!(ACPI_FADT + std::mem::size_of::<Fadt>() as u64 <= ACPI_DSDT);
};

/// The value that makes the bytes of `data` sum to zero mod 256, given
/// that the checksum byte itself is zero in `data`.
fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// A header for `signature`; length and checksum are filled by `finish`.
fn header(signature: &[u8; 4], revision: u8) -> SdtHeader {
    SdtHeader {
        signature: *signature,
        revision,
        oem_id: OEM_ID,
        oem_table_id: OEM_TABLE_ID,
        oem_revision: OEM_REVISION,
        creator_id: CREATOR_ID,
        creator_revision: CREATOR_REVISION,
        ..Default::default()
    }
}

/// Offsets of the length and checksum fields in an SDT header.
const LENGTH_AT: usize = 4;
const CHECKSUM_AT: usize = 9;
const HEADER_LEN: usize = std::mem::size_of::<SdtHeader>();
/// The ACPI 1.0 part of the RSDP, which its first checksum covers.
const RSDP_V1_LEN: usize = 20;

/// Sets a table's length and checksum; `table` starts with an SdtHeader.
fn finish(mut table: Vec<u8>) -> Vec<u8> {
    let len = (table.len() as u32).to_le_bytes();
    table[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&len);
    table[CHECKSUM_AT] = 0;
    table[CHECKSUM_AT] = checksum(&table);
    table
}

/// The RSDP naming the XSDT at `xsdt` (an address, or an offset the
/// loader turns into one).
fn rsdp(xsdt: u64) -> Rsdp {
    let mut r = Rsdp {
        signature: *b"RSD PTR ",
        oem_id: OEM_ID,
        revision: 2,
        length: std::mem::size_of::<Rsdp>() as u32,
        xsdt_addr: xsdt,
        ..Default::default()
    };
    r.checksum = checksum(&r.as_bytes()[..RSDP_V1_LEN]);
    r.extended_checksum = checksum(r.as_bytes());
    r
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = header(b"XSDT", 1).as_bytes().to_vec();
    for a in tables {
        t.extend_from_slice(&a.to_le_bytes());
    }
    finish(t)
}

/// The FADT naming the FACS and DSDT at `facs` and `dsdt` (addresses, or
/// offsets the loader turns into addresses).
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let pm1a_evt = Gas::io(PORT_PM1A_EVT, PM1A_EVT_LEN, 0);
    let pm1a_cnt = Gas::io(PORT_PM1A_CNT, PM1A_CNT_LEN, 0);
    let f = Fadt {
        header: header(b"FACP", FADT_REVISION),
        // The FACS goes in X_FIRMWARE_CTRL only: the spec wants one of the
        // two zero, and Linux lists the FACS twice when both are set.
        firmware_ctrl: 0,
        // Below 4 GiB on both paths (the loader's zones are too).
        dsdt: dsdt as u32,
        preferred_pm_profile: PM_PROFILE_UNSPECIFIED,
        sci_int: u16::from(SCI_IRQ),
        // No SMI command port: the machine is always in ACPI mode.
        smi_cmd: 0,
        pm1a_evt_blk: u32::from(PORT_PM1A_EVT),
        pm1a_cnt_blk: u32::from(PORT_PM1A_CNT),
        pm1_evt_len: PM1A_EVT_LEN,
        pm1_cnt_len: PM1A_CNT_LEN,
        // No PM timer, no GPE blocks, no C2/C3 (latencies over the limits).
        p_lvl2_lat: 101,
        p_lvl3_lat: 1001,
        century: CMOS_CENTURY,
        iapc_boot_arch: BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT,
        flags: FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP,
        reset_reg: Gas::io(PORT_RESET_CTRL, 1, ACCESS_BYTE),
        reset_value: RESET_VALUE,
        x_firmware_ctrl: facs,
        x_dsdt: dsdt,
        // Same blocks as the 32-bit fields; a mismatch draws a warning.
        x_pm1a_evt_blk: pm1a_evt,
        x_pm1a_cnt_blk: pm1a_cnt,
        ..Default::default()
    };
    finish(f.as_bytes().to_vec())
}

fn facs() -> Facs {
    Facs {
        signature: *b"FACS",
        length: std::mem::size_of::<Facs>() as u32,
        version: FACS_VERSION,
        ..Default::default()
    }
}

/// AML opcodes and prefixes used below (ACPI 6.5, 20.2).
const ZERO_OP: u8 = 0x00;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const DWORD_PREFIX: u8 = 0x0c;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;

/// PkgLength (20.2.4) for `body` bytes that follow it: the encoded length
/// counts its own bytes too.
fn pkg_length(body: usize) -> Vec<u8> {
    if body + 1 < 0x40 {
        return vec![(body + 1) as u8];
    }
    for n in 2..=4usize {
        let total = body + n;
        if total < 1 << (4 + 8 * (n - 1)) {
            let mut v = vec![((n - 1) << 6) as u8 | (total & 0xf) as u8];
            for i in 0..n - 1 {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    unreachable!("AML package too large")
}

/// `op [ext]` PkgLength `name` `body`.
fn aml_block(op: &[u8], name: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(name.len() + body.len()));
    v.extend_from_slice(name);
    v.extend_from_slice(body);
    v
}

fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![NAME_OP];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

fn aml_dword(v: u32) -> Vec<u8> {
    let mut b = vec![DWORD_PREFIX];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// Package () { elements } (each element already encoded).
fn aml_package(count: u8, elements: &[u8]) -> Vec<u8> {
    let mut body = vec![count];
    body.extend_from_slice(elements);
    aml_block(&[PACKAGE_OP], &[], &body)
}

/// The PCI root bridge's current resources:
///
/// ```text
/// ResourceTemplate () {
///     WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
///         0x0000, 0x0000, 0x0000, 0x0000, 0x0001)
///     IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
///     DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed,
///         NonCacheable, ReadWrite, 0x00000000,
///         window.start, window.end - 1, 0x00000000,
///         window.end - window.start)
/// }
/// ```
fn pci_crs(window: &std::ops::Range<u32>) -> Vec<u8> {
    const PRODUCER_MIN_MAX_FIXED: u8 = 0x0c;
    let mut r = vec![0x88, 13, 0, 2, PRODUCER_MIN_MAX_FIXED, 0];
    for v in [0u16, 0, 0, 0, 1] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    r.extend_from_slice(&[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
    // Memory; type-specific flags: read-write, non-cacheable.
    r.extend_from_slice(&[0x87, 23, 0, 0, PRODUCER_MIN_MAX_FIXED, 1]);
    for v in [
        0u32,
        window.start,
        window.end - 1,
        0,
        window.end - window.start,
    ] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    // End tag, checksum 0 ("the sum is zero").
    r.extend_from_slice(&[0x79, 0]);
    r
}

/// The DSDT's AML:
///
/// ```text
/// Name (\_S5, Package (0x04) { 0x05, Zero, Zero, Zero })
/// Scope (\_SB) {
///     Device (PCI0) {
///         Name (_HID, EisaId ("PNP0A03"))
///         Name (_UID, Zero)
///         Name (_SEG, Zero)
///         Name (_BBN, Zero)
///         Name (_CRS, ResourceTemplate () { ... see pci_crs ... })
///         Name (_PRT, Package (31) {
///             // slot s (1-31), pin A, no link device: GSI 16 + (s-1) % 8
///             Package (4) { 0x0001FFFF, Zero, Zero, 16 },
///             ...
///             Package (4) { 0x001FFFFF, Zero, Zero, 22 },
///         })
///     }
/// }
/// ```
/// `\_S5`: the first element is PM1a_CNT.SLP_TYP (devices/legacy/power.rs acts
/// on 5), the second PM1b's (there is none), the rest reserved.
///
/// Linux finds the PCI bus through PNP0A03 (type-1 config access, no
/// MCFG), takes the BAR window from _CRS and routes each slot's INTA#
/// through _PRT; with MSI-X (which virtio-pci drivers use first) the
/// _PRT matters only as a fallback.
fn dsdt_aml(window: &std::ops::Range<u32>) -> Vec<u8> {
    let elements = [BYTE_PREFIX, SLP_TYP_S5 as u8, ZERO_OP, ZERO_OP, ZERO_OP];
    let mut aml = vec![NAME_OP, b'\\'];
    aml.extend_from_slice(b"_S5_");
    aml.push(PACKAGE_OP);
    // PkgLength (one byte, counting itself), NumElements, the elements.
    aml.push((1 + 1 + elements.len()) as u8);
    aml.push(4);
    aml.extend_from_slice(&elements);

    let mut dev = Vec::new();
    // EisaId ("PNP0A03") compressed: 0x41d0 "PNP", 0x0a03.
    dev.extend(aml_name(b"_HID", &aml_dword(0x030a_d041)));
    dev.extend(aml_name(b"_UID", &[ZERO_OP]));
    dev.extend(aml_name(b"_SEG", &[ZERO_OP]));
    dev.extend(aml_name(b"_BBN", &[ZERO_OP]));
    let crs = pci_crs(window);
    let mut buf = vec![BYTE_PREFIX, crs.len() as u8];
    buf.extend_from_slice(&crs);
    let mut crs_obj = vec![BUFFER_OP];
    crs_obj.extend(pkg_length(buf.len()));
    crs_obj.extend(buf);
    dev.extend(aml_name(b"_CRS", &crs_obj));
    let mut prt = Vec::new();
    for slot in 1..crate::pci::SLOTS as u32 {
        let mut e = aml_dword((slot << 16) | 0xffff);
        e.extend_from_slice(&[
            ZERO_OP,
            ZERO_OP,
            BYTE_PREFIX,
            crate::pci::intx_gsi(slot as usize) as u8,
        ]);
        prt.extend(aml_package(4, &e));
    }
    dev.extend(aml_name(
        b"_PRT",
        &aml_package((crate::pci::SLOTS - 1) as u8, &prt),
    ));
    let device = aml_block(&[EXT_OP, DEVICE_OP], b"PCI0", &dev);
    aml.extend(aml_block(&[SCOPE_OP], b"\\_SB_", &device));
    aml
}

/// The DSDT, its PCI root bridge decoding memory `window`.
fn dsdt(window: &std::ops::Range<u32>) -> Vec<u8> {
    // Revision 2: integers in AML are 64 bits wide.
    let mut t = header(b"DSDT", 2).as_bytes().to_vec();
    t.extend_from_slice(&dsdt_aml(window));
    finish(t)
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut t = header(b"APIC", 5).as_bytes().to_vec();
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    // MAX_VCPUS is far below 255, so 8-bit APIC ids (no x2APIC entries).
    for id in 0..vcpus {
        t.extend_from_slice(
            MadtLocalApic {
                kind: MADT_LOCAL_APIC,
                length: std::mem::size_of::<MadtLocalApic>() as u8,
                processor_uid: id as u8,
                apic_id: id as u8,
                flags: LAPIC_ENABLED,
            }
            .as_bytes(),
        );
    }
    t.extend_from_slice(
        MadtIoApic {
            kind: MADT_IO_APIC,
            length: std::mem::size_of::<MadtIoApic>() as u8,
            id: ioapic_id(vcpus),
            address: IOAPIC_ADDR,
            gsi_base: 0,
            ..Default::default()
        }
        .as_bytes(),
    );
    // ISA IRQ 0 (the PIT) needs no override: KVM's default routing (which
    // we keep) wires GSI n to IOAPIC pin n, and the MP table says the same.
    // The SCI is level-triggered; active high, as on QEMU's PIIX4.
    t.extend_from_slice(
        MadtIntSourceOverride {
            kind: MADT_INT_SOURCE_OVERRIDE,
            length: std::mem::size_of::<MadtIntSourceOverride>() as u8,
            bus: ISA_BUS,
            source: SCI_IRQ,
            gsi: u32::from(SCI_IRQ),
            flags: INTI_ACTIVE_HIGH_LEVEL,
        }
        .as_bytes(),
    );
    t.extend_from_slice(
        MadtLocalApicNmi {
            kind: MADT_LOCAL_APIC_NMI,
            length: std::mem::size_of::<MadtLocalApicNmi>() as u8,
            processor_uid: ALL_PROCESSORS,
            flags: INTI_CONFORMING,
            lint: 1,
        }
        .as_bytes(),
    );
    finish(t)
}

/// Writes every table for `vcpus` CPUs; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u32) -> Result<u64, AcpiError> {
    let madt = madt(vcpus);
    if ACPI_MADT + madt.len() as u64 > ACPI_END {
        return Err(AcpiError::TooLarge(vcpus));
    }
    let tables: [(&'static str, u64, Vec<u8>); 6] = [
        ("RSDP", ACPI_RSDP, rsdp(ACPI_XSDT).as_bytes().to_vec()),
        ("XSDT", ACPI_XSDT, xsdt(&[ACPI_FADT, ACPI_MADT])),
        ("FACS", ACPI_FACS, facs().as_bytes().to_vec()),
        ("FADT", ACPI_FADT, fadt(ACPI_FACS, ACPI_DSDT)),
        ("DSDT", ACPI_DSDT, dsdt(&DIRECT_PCI_WINDOW)),
        ("MADT", ACPI_MADT, madt),
    ];
    for (name, addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| AcpiError::Write(name, e))?;
    }
    Ok(ACPI_RSDP)
}

/// Where a directly booted kernel's PCI BARs go (we place them).
const DIRECT_PCI_WINDOW: std::ops::Range<u32> = PCI_MMIO_START as u32..PCI_MMIO_END as u32;

/// The PCI hole under firmware: SeaBIOS places BARs between the end of
/// low RAM and the IOAPIC (from 2 GiB up on small VMs, top down from
/// 0xfec00000), as under QEMU, whose DSDT gives the same hole.
pub fn firmware_pci_window(low_ram_end: u64) -> std::ops::Range<u32> {
    // Low RAM ends at or below MMIO_GAP_START, so this fits in 32 bits.
    u32::try_from(low_ram_end).unwrap_or(IOAPIC_ADDR)..IOAPIC_ADDR
}

/// fw_cfg file names of QEMU's ACPI interface, which SeaBIOS looks for.
pub const LOADER_TABLES_FILE: &str = "etc/acpi/tables";
pub const LOADER_RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_SCRIPT_FILE: &str = "etc/table-loader";

/// The three fw_cfg files through which firmware loads our tables.
pub struct LoaderFiles {
    /// FACS, DSDT, FADT, MADT and XSDT, pointers as offsets into this blob.
    pub tables: Vec<u8>,
    /// The RSDP, its XSDT pointer an offset into `tables`.
    pub rsdp: Vec<u8>,
    /// The `etc/table-loader` script that places and patches both.
    pub script: Vec<u8>,
}

/// Appends `table` to `blob` at an 8-byte boundary; returns its offset.
fn append(blob: &mut Vec<u8>, table: &[u8]) -> u64 {
    blob.resize(blob.len().next_multiple_of(8), 0);
    let at = blob.len() as u64;
    blob.extend_from_slice(table);
    at
}

/// The tables for `vcpus` CPUs as QEMU's BIOS linker/loader files: the
/// same builders as [`write`], given offsets into the tables blob where
/// the direct path gives addresses; the script makes them addresses.
/// `pci_window` is the memory the PCI root bridge decodes: the firmware
/// places BARs itself, so it is the whole hole below 4 GiB that the
/// firmware may use (see [`firmware_pci_window`]).
pub fn loader_files(
    vcpus: u32,
    pci_window: std::ops::Range<u32>,
) -> Result<LoaderFiles, AcpiError> {
    const T: &str = LOADER_TABLES_FILE;
    let mut blob = Vec::new();
    // The FACS first: the blob's alignment below gives it its 64 bytes.
    let facs_at = append(&mut blob, facs().as_bytes());
    let dsdt_at = append(&mut blob, &dsdt(&pci_window));
    let fadt_at = append(&mut blob, &fadt(facs_at, dsdt_at));
    let madt_at = append(&mut blob, &madt(vcpus));
    let listed = [fadt_at, madt_at];
    let xsdt_at = append(&mut blob, &xsdt(&listed));
    let rsdp = rsdp(xsdt_at).as_bytes().to_vec();

    // The blob is a few KiB (the MADT at MAX_VCPUS included), so every
    // offset fits the script's 32-bit fields.
    let off = |at: u64, field: usize| (at as usize + field) as u32;
    let len = |at: u64| -> u32 {
        let len = &blob[at as usize + LENGTH_AT..at as usize + LENGTH_AT + 4];
        u32::from_le_bytes([len[0], len[1], len[2], len[3]])
    };
    let mut l = TableLoader::default();
    l.allocate(T, 64, LoaderZone::High)?;
    l.add_pointer(T, T, off(fadt_at, std::mem::offset_of!(Fadt, dsdt)), 4)?;
    l.add_pointer(
        T,
        T,
        off(fadt_at, std::mem::offset_of!(Fadt, x_firmware_ctrl)),
        8,
    )?;
    l.add_pointer(T, T, off(fadt_at, std::mem::offset_of!(Fadt, x_dsdt)), 8)?;
    for i in 0..listed.len() {
        l.add_pointer(T, T, off(xsdt_at, HEADER_LEN + 8 * i), 8)?;
    }
    // Each table's checksum after its pointers are patched; the DSDT and
    // MADT hold none, but QEMU sums every table too.
    for at in [dsdt_at, fadt_at, madt_at, xsdt_at] {
        l.add_checksum(T, off(at, CHECKSUM_AT), off(at, 0), len(at))?;
    }
    // The RSDP in the segment where guests scan for it.
    l.allocate(LOADER_RSDP_FILE, 16, LoaderZone::Fseg)?;
    l.add_pointer(
        LOADER_RSDP_FILE,
        T,
        std::mem::offset_of!(Rsdp, xsdt_addr) as u32,
        8,
    )?;
    l.add_checksum(
        LOADER_RSDP_FILE,
        std::mem::offset_of!(Rsdp, checksum) as u32,
        0,
        RSDP_V1_LEN as u32,
    )?;
    l.add_checksum(
        LOADER_RSDP_FILE,
        std::mem::offset_of!(Rsdp, extended_checksum) as u32,
        0,
        rsdp.len() as u32,
    )?;
    Ok(LoaderFiles {
        tables: blob,
        rsdp,
        script: l.into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(std::mem::size_of::<SdtHeader>(), 36);
        assert_eq!(std::mem::size_of::<Rsdp>(), 36);
        assert_eq!(std::mem::size_of::<Gas>(), 12);
        assert_eq!(std::mem::size_of::<Fadt>(), 276);
        assert_eq!(std::mem::size_of::<Facs>(), 64);
        assert_eq!(std::mem::size_of::<MadtLocalApic>(), 8);
        assert_eq!(std::mem::size_of::<MadtIoApic>(), 12);
        assert_eq!(std::mem::size_of::<MadtIntSourceOverride>(), 10);
        assert_eq!(std::mem::size_of::<MadtLocalApicNmi>(), 6);
    }

    #[test]
    fn layout_fits_and_is_aligned() {
        assert!(ACPI_DSDT + dsdt(&DIRECT_PCI_WINDOW).len() as u64 <= ACPI_MADT);
        assert!(
            ACPI_MADT + madt(vmd_proto::vm::MAX_VCPUS).len() as u64
                <= crate::arch::x86_64::layout::BIOS_ROM_START
        );
    }

    /// Reads the table at `addr` back: checks signature, length, checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], sig);
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= 36);
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn written(vcpus: u32) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert_eq!(write(&mem, vcpus).unwrap(), ACPI_RSDP);
        mem
    }

    #[test]
    fn rsdp_points_to_the_xsdt_and_both_checksums_hold() {
        let mem = written(2);
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(ACPI_RSDP)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        assert_eq!(r[15], 2);
        assert_eq!(u32_at(&r, 20), 36);
        assert_eq!(u64_at(&r, 24), ACPI_XSDT);
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let mem = written(2);
        let x = table(&mem, ACPI_XSDT, b"XSDT");
        assert_eq!(x.len(), 36 + 16);
        assert_eq!(u64_at(&x, 36), ACPI_FADT);
        assert_eq!(u64_at(&x, 44), ACPI_MADT);
    }

    #[test]
    fn fadt_fields() {
        let mem = written(1);
        let f = table(&mem, ACPI_FADT, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], FADT_REVISION);
        assert_eq!(u32_at(&f, 36), 0);
        assert_eq!(u32_at(&f, 40), ACPI_DSDT as u32);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9); // SCI_INT
        assert_eq!(u32_at(&f, 48), 0); // SMI_CMD
        assert_eq!(u32_at(&f, 56), 0x600); // PM1a_EVT_BLK
        assert_eq!(u32_at(&f, 64), 0x604); // PM1a_CNT_BLK
        assert_eq!(u32_at(&f, 76), 0); // PM_TMR_BLK
        assert_eq!((f[88], f[89]), (4, 2));
        assert_eq!(u32_at(&f, 112) & (1 << 20), 0); // not HW-reduced
        assert_ne!(u32_at(&f, 112) & FADT_RESET_REG_SUP, 0);
        // RESET_REG: system I/O, 8 bits, port 0xcf9; value 6.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&f, 120), 0xcf9);
        assert_eq!(f[128], 6);
        assert_eq!(u64_at(&f, 132), ACPI_FACS);
        assert_eq!(u64_at(&f, 140), ACPI_DSDT);
        assert_eq!(&f[148..150], &[1, 32]);
        assert_eq!(u64_at(&f, 152), 0x600);
        assert_eq!(&f[172..174], &[1, 16]);
        assert_eq!(u64_at(&f, 176), 0x604);
        let mut facs = [0u8; 64];
        mem.read_slice(&mut facs, GuestAddress(ACPI_FACS)).unwrap();
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);
    }

    #[test]
    fn dsdt_has_s5_matching_the_power_device() {
        let mem = written(1);
        let d = table(&mem, ACPI_DSDT, b"DSDT");
        assert_eq!(
            &d[36..50],
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]
        );
        assert_eq!(u16::from(d[46]), SLP_TYP_S5);
    }

    /// Runs a table-loader script as SeaBIOS does, placing the tables file
    /// at `tables_base` and the RSDP at `rsdp_base`; returns both.
    fn run_loader(f: &LoaderFiles, tables_base: u64, rsdp_base: u64) -> (Vec<u8>, Vec<u8>) {
        let name = |b: &[u8]| {
            let end = b.iter().position(|c| *c == 0).unwrap();
            String::from_utf8(b[..end].to_vec()).unwrap()
        };
        let mut tables = f.tables.clone();
        let mut rsdp = f.rsdp.clone();
        let mut allocated = Vec::new();
        assert_eq!(f.script.len() % 128, 0);
        for e in f.script.chunks(128) {
            match u32_at(e, 0) {
                1 => {
                    let file = name(&e[4..60]);
                    let (align, zone) = (u32_at(e, 60), e[64]);
                    match file.as_str() {
                        LOADER_TABLES_FILE => {
                            assert_eq!((zone, tables_base % u64::from(align)), (1, 0));
                        }
                        LOADER_RSDP_FILE => {
                            assert_eq!((zone, rsdp_base % u64::from(align)), (2, 0));
                        }
                        other => panic!("allocates unknown file {other}"),
                    }
                    allocated.push(file);
                }
                2 => {
                    let (dest, src) = (name(&e[4..60]), name(&e[60..116]));
                    assert!(allocated.contains(&dest) && allocated.contains(&src));
                    assert_eq!(src, LOADER_TABLES_FILE);
                    let (at, size) = (u32_at(e, 116) as usize, usize::from(e[120]));
                    let d = if dest == LOADER_RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&d[at..at + size]);
                    let patched = (u64::from_le_bytes(v) + tables_base).to_le_bytes();
                    d[at..at + size].copy_from_slice(&patched[..size]);
                }
                3 => {
                    let file = name(&e[4..60]);
                    let (at, start, len) = (
                        u32_at(e, 60) as usize,
                        u32_at(e, 64) as usize,
                        u32_at(e, 68) as usize,
                    );
                    let d = if file == LOADER_RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let s = sum(&d[start..start + len]);
                    d[at] = d[at].wrapping_sub(s);
                }
                c => panic!("unknown loader command {c}"),
            }
        }
        (tables, rsdp)
    }

    #[test]
    fn loader_files_patch_into_the_same_tables_as_the_direct_path() {
        let f = loader_files(2, DIRECT_PCI_WINDOW).unwrap();
        let (tables_base, rsdp_base) = (0x7ff_0000u64, 0xf5a10u64);
        let (t, r) = run_loader(&f, tables_base, rsdp_base);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!((sum(&r[..20]), sum(&r)), (0, 0));
        let at = |addr: u64| (addr - tables_base) as usize;
        let placed = |addr: u64, sig: &[u8; 4]| {
            let o = at(addr);
            assert_eq!(&t[o..o + 4], sig);
            let b = &t[o..o + u32_at(&t, o + 4) as usize];
            assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(sig));
            b.to_vec()
        };
        let x = placed(u64_at(&r, 24), b"XSDT");
        let fadt = placed(u64_at(&x, 36), b"FACP");
        let madt = placed(u64_at(&x, 44), b"APIC");
        assert_eq!(u64::from(u32_at(&fadt, 40)), u64_at(&fadt, 140));
        let dsdt = placed(u64_at(&fadt, 140), b"DSDT");
        let facs = u64_at(&fadt, 132);
        assert_eq!(facs % 64, 0);
        assert_eq!(&t[at(facs)..at(facs) + 4], b"FACS");
        // Besides the pointers, byte for byte what a kernel gets.
        let mem = written(2);
        let direct = |addr: u64, sig: &[u8; 4]| table(&mem, addr, sig);
        assert_eq!(dsdt, direct(ACPI_DSDT, b"DSDT"));
        assert_eq!(madt, direct(ACPI_MADT, b"APIC"));
        let d = direct(ACPI_FADT, b"FACP");
        assert_eq!(fadt[..9], d[..9]);
        assert_eq!(fadt[10..40], d[10..40]);
        assert_eq!(fadt[44..132], d[44..132]);
        assert_eq!(fadt[148..], d[148..]);
    }

    #[test]
    fn firmware_dsdt_hands_the_whole_pci_hole_to_the_root_bridge() {
        let w = firmware_pci_window(64 << 20);
        assert_eq!(w, 0x0400_0000..0xfec0_0000);
        let d = dsdt(&w);
        let crs = d.windows(3).position(|x| x == [0x87, 23, 0]).unwrap();
        assert_eq!(u32_at(&d, crs + 10), 0x0400_0000);
        assert_eq!(u32_at(&d, crs + 14), 0xfebf_ffff);
        assert_eq!(u32_at(&d, crs + 22), 0xfec0_0000 - 0x0400_0000);
        let f = loader_files(1, w).unwrap();
        assert!(f.tables.windows(d.len()).any(|x| x == d));
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(62), vec![63]);
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0x200), vec![0x42, 0x20]);
        assert_eq!(pkg_length(5000), vec![0x8b, 0x38, 0x01]);
    }

    #[test]
    fn dsdt_has_the_pci_root_bridge() {
        let mem = written(1);
        let d = table(&mem, ACPI_DSDT, b"DSDT");
        let find = |needle: &[u8]| d.windows(needle.len()).position(|w| w == needle);
        let scope = find(&[0x10]).unwrap();
        assert_eq!(&d[scope + 3..scope + 8], b"\\_SB_");
        let dev = find(&[0x5b, 0x82]).unwrap();
        assert_eq!(&d[dev + 4..dev + 8], b"PCI0");
        // _HID EisaId ("PNP0A03").
        let hid = find(b"_HID").unwrap();
        assert_eq!(&d[hid + 4..hid + 9], &[0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        // _CRS: the memory window.
        let crs = find(&[0x87, 23, 0]).unwrap();
        assert_eq!(u32_at(&d, crs + 10), 0xe000_0000);
        assert_eq!(u32_at(&d, crs + 14), 0xfbff_ffff);
        // _PRT: 31 entries, slot 1 pin A on GSI 16, slot 9 on 16 again.
        let prt = find(b"_PRT").unwrap();
        assert_eq!(d[prt + 4], 0x12);
        assert_eq!(d[prt + 7], 31);
        let e1 = find(&[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00]).unwrap();
        assert_eq!(&d[e1 + 8..e1 + 12], &[0, 0, 0x0a, 16]);
        let e8 = find(&[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x08, 0x00]).unwrap();
        assert_eq!(d[e8 + 11], 23);
        // The outer lengths add up to the table's end.
        assert!(ACPI_DSDT + d.len() as u64 <= ACPI_MADT);
    }

    /// `(type, entry bytes)` for each MADT entry.
    fn madt_entries(m: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < m.len() {
            let len = usize::from(m[at + 1]);
            assert!(len >= 2 && at + len <= m.len());
            out.push((m[at], m[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, m.len());
        out
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu() {
        for vcpus in [1, 2, 7, vmd_proto::vm::MAX_VCPUS] {
            let mem = written(vcpus);
            let m = table(&mem, ACPI_MADT, b"APIC");
            assert_eq!(u32_at(&m, 36), 0xfee0_0000);
            assert_eq!(u32_at(&m, 40), MADT_PCAT_COMPAT);
            let entries = madt_entries(&m);
            let cpus: Vec<_> = entries.iter().filter(|(k, _)| *k == 0).collect();
            assert_eq!(cpus.len() as u32, vcpus);
            for (i, (_, e)) in cpus.iter().enumerate() {
                assert_eq!((e[2], e[3]), (i as u8, i as u8));
                assert_eq!(u32_at(e, 4), 1);
            }
            let ioapic: Vec<_> = entries.iter().filter(|(k, _)| *k == 1).collect();
            assert_eq!(ioapic.len(), 1);
            assert_eq!(ioapic[0].1[2], ioapic_id(vcpus));
            assert_eq!(u32_at(&ioapic[0].1, 4), 0xfec0_0000);
            let iso: Vec<_> = entries.iter().filter(|(k, _)| *k == 2).collect();
            assert_eq!(iso.len(), 1);
            assert_eq!(&iso[0].1[2..4], &[0, 9]);
            assert_eq!(u32_at(&iso[0].1, 4), 9);
            assert_eq!(u16::from_le_bytes([iso[0].1[8], iso[0].1[9]]), 0xd);
            let nmi: Vec<_> = entries.iter().filter(|(k, _)| *k == 4).collect();
            assert_eq!(nmi.len(), 1);
            assert_eq!(nmi[0].1, vec![4, 6, 0xff, 0, 0, 1]);
        }
    }
}
