//! Interrupt plumbing for PCI functions: the VM's GSI routing table (KVM's
//! default IOAPIC/PIC routes plus one MSI route per MSI-X vector) and the
//! level-triggered INTx line (irqfd with resample).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::IOAPIC_PINS;

/// Most GSIs handed out for MSI-X (KVM allows 4096 routes in all).
const MAX_MSI_GSIS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("no GSIs left for {0} MSI-X vectors")]
    Exhausted(u32),
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Routing(kvm_ioctls::Error),
    #[error("routing table: {0}")]
    Table(String),
    #[error("{what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// An MSI as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole
/// table, so the default IOAPIC/PIC routes are rewritten with every MSI
/// change.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<GsiRouter> {
        Arc::new(GsiRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        })
    }

    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// `n` fresh GSIs above the IOAPIC's.
    pub fn allocate(&self, n: u32) -> Result<Vec<u32>, IrqError> {
        let mut s = self.lock();
        let end = s
            .next_gsi
            .checked_add(n)
            .filter(|e| *e <= IOAPIC_PINS + MAX_MSI_GSIS)
            .ok_or(IrqError::Exhausted(n))?;
        let gsis = (s.next_gsi..end).collect();
        s.next_gsi = end;
        Ok(gsis)
    }

    /// Routes `gsi` to `msg` (or removes its route) and updates KVM.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut s = self.lock();
        match msg {
            Some(m) => s.msi.insert(gsi, m),
            None => s.msi.remove(&gsi),
        };
        let table = routing_table(&s.msi)?;
        self.vm.set_gsi_routing(&table).map_err(IrqError::Routing)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routes (GSI n to IOAPIC pin n, and to the PICs for
/// n < 16) plus the MSI routes.
fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Result<KvmIrqRouting, IrqError> {
    let mut entries = Vec::with_capacity(40 + msi.len());
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    for (gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi: *gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    KvmIrqRouting::from_entries(&entries).map_err(|e| IrqError::Table(format!("{e:?}")))
}

/// A level-triggered INTx line into the IOAPIC: writing `irq` asserts it;
/// KVM lowers it when the guest acknowledges (EOI) and then signals
/// `resample`, so the device can assert it again while it still has an
/// interrupt pending.
pub struct IntxLine {
    pub gsi: u32,
    pub irq: EventFd,
    pub resample: EventFd,
}

impl IntxLine {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<IntxLine, IrqError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        vm.register_irqfd_with_resample(&irq, &resample, gsi)
            .map_err(|err| IrqError::Kvm {
                what: "KVM_IRQFD (resample) for INTx",
                err,
            })?;
        Ok(IntxLine { gsi, irq, resample })
    }

    pub fn assert(&self) {
        if let Err(e) = self.irq.write(1) {
            log::warn!("INTx GSI {}: {e}", self.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_plus_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        );
        let t = routing_table(&msi).unwrap();
        let e = t.as_slice();
        assert_eq!(e.len(), 24 + 16 + 1);
        let last = e[e.len() - 1];
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry, as its type says.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_0000, 0, 0x41));
        // GSI 2 goes to IOAPIC pin 2 and PIC master pin 2, as KVM's default.
        let two: Vec<_> = e.iter().filter(|x| x.gsi == 2).collect();
        assert_eq!(two.len(), 2);
    }
}
