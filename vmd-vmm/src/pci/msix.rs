//! MSI-X: the capability, the vector table and the pending-bit array
//! (both inside a BAR), each vector delivered through its own irqfd on a
//! GSI routed as MSI. Masked vectors latch their pending bit and fire when
//! unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::irq::{GsiRouter, IrqError, MsiMessage};

pub const CAP_ID_MSIX: u8 = 0x11;
/// Message control: MSI-X enable and function mask.
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors per function (the table-size field has 11 bits).
pub const MAX_VECTORS: u16 = 2048;

pub struct Msix {
    /// addr_lo, addr_hi, data, vector control, per vector.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    irqfds: Vec<EventFd>,
    gsis: Vec<u32>,
    /// The message each GSI is routed to in KVM now.
    routed: Vec<Option<MsiMessage>>,
    router: Arc<GsiRouter>,
    control: u16,
}

impl Msix {
    pub fn new(vectors: u16, router: Arc<GsiRouter>) -> Result<Msix, IrqError> {
        let n = vectors.clamp(1, MAX_VECTORS);
        let gsis = router.allocate(u32::from(n))?;
        let mut irqfds = Vec::with_capacity(gsis.len());
        for gsi in &gsis {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            router
                .vm()
                .register_irqfd(&fd, *gsi)
                .map_err(|err| IrqError::Kvm {
                    what: "KVM_IRQFD for MSI-X",
                    err,
                })?;
            irqfds.push(fd);
        }
        Ok(Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; usize::from(n)],
            pending: vec![false; usize::from(n)],
            irqfds,
            gsis,
            routed: vec![None; usize::from(n)],
            router,
            control: 0,
        })
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// The capability body (id, next, control, table and PBA locations)
    /// and its write mask (enable and function-mask bits only).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = CAP_ID_MSIX;
        body[2..4].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut wmask = [0u8; 12];
        wmask[3] = ((CONTROL_ENABLE | CONTROL_MASK) >> 8) as u8;
        (body, wmask)
    }

    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// The guest wrote the message control word.
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CONTROL_ENABLE | CONTROL_MASK);
        for v in 0..self.table.len() {
            self.update(v);
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let (v, word, byte) = ((at / 16) as usize, ((at % 16) / 4) as usize, at % 4);
            *b = self
                .table
                .get(v)
                .map_or(0, |e| (e[word] >> (8 * byte)) as u8);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = None;
        for (i, b) in data.iter().enumerate() {
            let at = offset + i as u64;
            let (v, word, byte) = ((at / 16) as usize, ((at % 16) / 4) as usize, at % 4);
            if let Some(e) = self.table.get_mut(v) {
                let shift = 8 * byte;
                e[word] = (e[word] & !(0xff << shift)) | (u32::from(*b) << shift);
                touched = Some(v);
            }
        }
        if let Some(v) = touched {
            self.update(v);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = (offset + i as u64) * 8;
            let mut v = 0u8;
            for k in 0..8 {
                if self.pending.get((bit0 + k) as usize) == Some(&true) {
                    v |= 1 << k;
                }
            }
            *b = v;
        }
    }

    /// The GSI an interrupt source may signal directly (an extra irqfd on
    /// it) for `vector`: MSI-X on, the vector unmasked and routed. `None`
    /// while it must go through [`Msix::notify`] (masking latches pending).
    pub fn direct_gsi(&self, vector: u16) -> Option<u32> {
        let v = usize::from(vector);
        let ok =
            self.enabled() && v < self.table.len() && !self.masked(v) && self.routed[v].is_some();
        ok.then(|| self.gsis[v])
    }

    fn masked(&self, v: usize) -> bool {
        self.control & CONTROL_MASK != 0 || self.table[v][3] & VECTOR_MASKED != 0
    }

    /// Brings vector `v`'s KVM route in line with its entry and fires a
    /// pending interrupt once it is unmasked.
    fn update(&mut self, v: usize) {
        if !self.enabled() || self.masked(v) {
            return;
        }
        let e = self.table[v];
        let msg = MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        };
        if self.routed[v] != Some(msg) {
            match self.router.set_msi(self.gsis[v], Some(msg)) {
                Ok(()) => self.routed[v] = Some(msg),
                Err(e) => log::warn!("MSI-X vector {v}: {e}"),
            }
        }
        if self.pending[v] {
            self.pending[v] = false;
            self.fire(v);
        }
    }

    fn fire(&self, v: usize) {
        if let Err(e) = self.irqfds[v].write(1) {
            log::warn!("MSI-X vector {v}: irqfd: {e}");
        }
    }

    /// Raises `vector`; a masked one becomes pending. Out-of-range
    /// vectors are dropped.
    pub fn notify(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            // The route may be stale if the guest rewrote the entry while
            // unmasked (allowed, if unusual): refresh it first.
            self.update(v);
            self.fire(v);
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for (fd, gsi) in self.irqfds.iter().zip(&self.gsis) {
            let _ = self.router.vm().unregister_irqfd(fd, *gsi);
        }
    }
}
