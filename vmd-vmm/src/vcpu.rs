//! One vCPU: its setup (CPUID, MSRs, FPU, LAPIC, and on the boot CPU the
//! registers of the chosen boot path) and its run loop, one thread each.
//!
//! Application processors get no registers: they wait in KVM's
//! wait-for-SIPI state until the guest starts them through the in-kernel
//! LAPIC (INIT, SIPI, SIPI).
//!
//! Kicking: a vCPU thread blocked in KVM_RUN is interrupted by sending it
//! [`kick_signal`]. The handler sets `immediate_exit` in the thread's
//! `kvm_run`, so KVM_RUN returns EINTR at once even if the signal lands
//! just before the thread enters it; the loop then checks why it was
//! kicked: stopping, or pausing (it then parks, see [`ExitSignal::park`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmd_proto::vm::ExitReason;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::boot::BootEntry;
use crate::arch::x86_64::gdt::{self, CODE32_SEL, CODE64_SEL, DATA_SEL, TSS_SEL};
use crate::arch::x86_64::layout::{BOOT_STACK, GDT_ADDR, PML4_ADDR, PVH_START_INFO, ZERO_PAGE};
use crate::bus::Bus;
use crate::lifecycle::ExitSignal;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{0}: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {total} boot MSRs (refused MSR {index:#x})")]
    Msrs {
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("building the MSR list: {0}")]
    MsrList(String),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot start the vCPU thread: {0}")]
    Thread(std::io::Error),
}

// ---- Setup ----

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MISC_ENABLE: fast string operations on, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it a guest
/// treats all RAM as uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values firmware would leave behind: syscall MSRs cleared, TSC
/// at zero, fast strings and write-back MTRRs on.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// LAPIC local vector table entries and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Delivery mode bits [10:8] set to `mode`, unmasked.
fn lvt_mode(reg: u32, mode: u32) -> u32 {
    const MASKED: u32 = 1 << 16;
    (reg & !(0x700 | MASKED)) | (mode << 8)
}

/// Prepares a vCPU with its own `cpuid`; the boot CPU (`boot` given) also
/// gets its LAPIC wiring and the boot path's registers.
pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId, boot: Option<BootEntry>) -> Result<(), VcpuError> {
    let io = |what| move |e| VcpuError::Ioctl(what, e);
    vcpu.set_cpuid2(cpuid).map_err(io("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(VcpuError::Msrs {
            set,
            total: entries.len(),
            index: entries.get(set).map_or(0, |e| e.index),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,    // x87 control word after FNINIT
        mxcsr: 0x1f80, // all SSE exceptions masked
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(io("KVM_SET_FPU"))?;

    if let Some(entry) = boot {
        // The boot CPU takes the PIC's interrupts as ExtINT on LINT0 and
        // NMIs on LINT1 (virtual wire mode, as the MP table says).
        let mut lapic = vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
        let lint0 = lapic_reg(&lapic.regs, APIC_LVT_LINT0);
        set_lapic_reg(
            &mut lapic.regs,
            APIC_LVT_LINT0,
            lvt_mode(lint0, APIC_MODE_EXTINT),
        );
        let lint1 = lapic_reg(&lapic.regs, APIC_LVT_LINT1);
        set_lapic_reg(
            &mut lapic.regs,
            APIC_LVT_LINT1,
            lvt_mode(lint1, APIC_MODE_NMI),
        );
        vcpu.set_lapic(&lapic).map_err(io("KVM_SET_LAPIC"))?;

        let mut sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
        // Firmware starts where a real CPU does: KVM's reset state.
        if let Some(regs) = boot_registers(entry, &mut sregs) {
            vcpu.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;
            vcpu.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
        }
    }
    Ok(())
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Fills `sregs` for the boot path and returns the general registers;
/// `None` (and `sregs` untouched) for firmware, which needs none.
fn boot_registers(entry: BootEntry, sregs: &mut kvm_sregs) -> Option<kvm_regs> {
    if entry == BootEntry::Firmware {
        return None;
    }
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = gdt::gdt_limit();
    // No IDT: any exception before the guest sets one up triple-faults,
    // which we report as a crash.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = gdt::segment(DATA_SEL);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(TSS_SEL);
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry } => {
            // 32-bit flat protected mode, paging off.
            sregs.cs = gdt::segment(CODE32_SEL);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_START_INFO;
        }
        BootEntry::Linux64 { entry } => {
            // Long mode on the identity map.
            sregs.cs = gdt::segment(CODE64_SEL);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = ZERO_PAGE;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
        BootEntry::Firmware => return None,
    }
    Some(regs)
}

// ---- Kicking ----

thread_local! {
    /// This thread's kvm_run, for the kick handler. Null outside the loop.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one volatile store into our own
    // kvm_run, which stays mapped while the pointer is set.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: set by this very thread to its live kvm_run mapping and
        // cleared before that mapping goes away.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (process-wide; call before starting vCPUs).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::Signal)
}

/// Interrupts a vCPU thread so it re-checks the VM's state.
pub fn kick(thread: &JoinHandle<()>) {
    if thread.is_finished() {
        return;
    }
    if let Err(e) = thread.kill(kick_signal()) {
        log::debug!("kicking vCPU thread: {e}");
    }
}

// ---- Running ----

pub struct Vcpu {
    pub id: u32,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
}

/// Whether vCPU threads put the `Vcpu` seccomp filter on themselves (the
/// daemon's VM process; not vmd-vmm's in-process tests).
static NARROW_FILTER: AtomicBool = AtomicBool::new(false);

/// From now on every vCPU thread narrows itself to the `Vcpu` filter as
/// it starts, on top of the process's.
pub fn narrow_vcpu_threads() {
    NARROW_FILTER.store(true, Ordering::SeqCst);
}

impl Vcpu {
    /// Starts the vCPU's thread. Whatever ends the guest on this vCPU is
    /// reported through the exit signal.
    pub fn spawn(self) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                let exit = self.exit.clone();
                if NARROW_FILTER.load(Ordering::SeqCst) {
                    if let Err(e) = vmd_sandbox::apply_thread_seccomp(vmd_sandbox::Role::Vcpu) {
                        exit.request(ExitReason::VmmError(format!("vCPU {}: {e}", self.id)));
                        return;
                    }
                }
                if let Some(reason) = self.run() {
                    exit.request(reason);
                }
            })
            .map_err(VcpuError::Thread)
    }

    /// Runs the guest until it ends (`Some(why)`) or the VM is stopping.
    fn run(mut self) -> Option<ExitReason> {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let reason = self.run_loop();
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        reason
    }

    fn run_loop(&mut self) -> Option<ExitReason> {
        let id = self.id;
        loop {
            if self.exit.is_stopping() {
                return None;
            }
            if self.exit.pause_requested() {
                // Paused: wait outside KVM_RUN until unpaused or stopping,
                // then look again. An AP still waiting for its SIPI parks
                // the same way (the kick took it out of KVM_RUN's wait);
                // its mp_state is untouched, so its next KVM_RUN goes back
                // to waiting for the SIPI.
                self.exit.park();
                continue;
            }
            let crash = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::Shutdown) => Some("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
                Ok(VcpuExit::Hlt) => Some("unexpected halt exit (KVM_EXIT_HLT)".into()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                    "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu})"
                )),
                Ok(VcpuExit::InternalError) => Some(self.internal_error()),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Some(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => return Some(ExitReason::Reboot),
                    KVM_SYSTEM_EVENT_CRASH => Some("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into()),
                    other => Some(format!("unexpected system event {other} (KVM_EXIT_SYSTEM_EVENT)")),
                },
                Ok(other) => Some(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    // Kicked: clear the flag and look at the VM's state.
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                // An AP's first KVM_RUN after its SIPI may say EAGAIN.
                Err(e) if e.errno() == libc::EAGAIN => None,
                Err(e) => {
                    let msg = format!("vCPU {id}: KVM_RUN: {e}");
                    log::error!("{msg}");
                    return Some(ExitReason::VmmError(msg));
                }
            };
            if let Some(what) = crash {
                let text = format!("vCPU {id}: {what}; {}", self.registers());
                log::error!("guest crashed: {text}");
                return Some(ExitReason::GuestCrash(text));
            }
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR: usually an instruction KVM cannot emulate.
    fn internal_error(&mut self) -> String {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member KVM filled in.
        let info = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match info.suberror {
            1 => "emulation failure",
            2 => "exception while delivering an exception",
            3 => "error while delivering an event",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let n = (info.ndata as usize).min(info.data.len());
        log::error!(
            "KVM internal error, suberror {} ({what}), data {:x?}",
            info.suberror,
            &info.data[..n]
        );
        format!(
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {}: {what}, data {:x?})",
            info.suberror,
            &info.data[..n]
        )
    }

    /// The registers that tell where and in which mode the guest was.
    fn registers(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (base {:#x}, l={} db={}) ss={:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
                s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.ss.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_sets_mode_and_unmasks() {
        assert_eq!(lvt_mode(0x1_0000, APIC_MODE_EXTINT), 0x700);
        assert_eq!(lvt_mode(0x1_0700, APIC_MODE_NMI), 0x400);
    }

    #[test]
    fn pvh_registers() {
        let mut s = kvm_sregs::default();
        let r = boot_registers(BootEntry::Pvh { entry: 0x10_0000 }, &mut s).unwrap();
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, PVH_START_INFO, 2));
        assert_eq!(
            (s.cr0, s.efer, s.cs.selector, s.cs.db),
            (0x11, 0, CODE32_SEL, 1)
        );
    }

    #[test]
    fn linux64_registers() {
        let mut s = kvm_sregs::default();
        let r = boot_registers(BootEntry::Linux64 { entry: 0x100_0000 }, &mut s).unwrap();
        assert_eq!((r.rip, r.rsi), (0x100_0000, ZERO_PAGE));
        assert_eq!((s.cr3, s.cs.selector, s.cs.l), (PML4_ADDR, CODE64_SEL, 1));
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
    }

    #[test]
    fn firmware_keeps_the_reset_state() {
        let mut s = kvm_sregs::default();
        s.cs.selector = 0xf000;
        assert!(boot_registers(BootEntry::Firmware, &mut s).is_none());
        assert_eq!((s.cs.selector, s.gdt.base), (0xf000, 0));
    }
}
