//! Guest RAM: one memfd (shared memory no path names), mapped
//! MAP_SHARED | MAP_NORESERVE here and, for their DMA, in the VM's device
//! processes, so memory the guest never touches costs the host nothing.
//! RAM past [`MMIO_GAP_START`] is moved above 4 GiB to leave room for
//! devices; both ranges are consecutive pieces of the one memfd.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{HIGH_RAM_START, KERNEL_START, MMIO_GAP_START};

/// Anything smaller cannot hold a kernel at 1 MiB (the one limit clients
/// are checked against too).
pub const MIN_RAM: u64 = vmd_proto::vm::MIN_MEMORY;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} bytes is too small (need at least {MIN_RAM})")]
    TooSmall(u64),
    #[error("{0} bytes is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error("guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    #[error("guest RAM regions {0:x?} do not fit the memfd of {1} bytes")]
    Regions(Vec<(u64, u64, u64)>, u64),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}: {err}")]
    Register { slot: u32, err: kvm_ioctls::Error },
    #[error("the thread registering guest RAM with KVM panicked")]
    RegisterThread,
}

/// Where RAM lies in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    /// RAM is `[0, low_end)` ...
    pub low_end: u64,
    /// ... plus `[4 GiB, 4 GiB + high_size)`.
    pub high_size: u64,
}

impl RamLayout {
    pub fn new(size: u64) -> Result<RamLayout, MemoryError> {
        if size < MIN_RAM || size <= KERNEL_START {
            return Err(MemoryError::TooSmall(size));
        }
        if size & (PAGE - 1) != 0 {
            return Err(MemoryError::Unaligned(size));
        }
        let low_end = size.min(MMIO_GAP_START);
        Ok(RamLayout {
            low_end,
            high_size: size - low_end,
        })
    }

    /// `(start, length)` of each RAM range.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, self.low_end)];
        if self.high_size > 0 {
            r.push((HIGH_RAM_START, self.high_size));
        }
        r
    }
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    /// (guest address, length, offset in the memfd) of each range.
    pub regions: Vec<(u64, u64, u64)>,
}

/// Creates the memfd for `layout` and maps guest RAM from it.
pub fn create(layout: &RamLayout) -> Result<GuestRam, MemoryError> {
    let name = c"vmd-guest-ram";
    // SAFETY: a valid C string; the fd returned is ours alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd to us.
    let memfd = unsafe { File::from_raw_fd(fd) };
    let size: u64 = layout.ranges().iter().map(|r| r.1).sum();
    memfd.set_len(size).map_err(MemoryError::Memfd)?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for (start, len) in layout.ranges() {
        regions.push((start, len, offset));
        offset += len;
    }
    let mem = map_shared(&memfd, &regions)?;
    Ok(GuestRam {
        mem,
        memfd,
        regions,
    })
}

/// Maps `regions` of the guest RAM memfd shared (a device process does
/// this with the memfd its VM process sends). Regions must lie inside the
/// memfd and not overlap in guest addresses.
pub fn map_shared(
    memfd: &File,
    regions: &[(u64, u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let size = memfd.metadata().map_err(MemoryError::Memfd)?.len();
    let fits = regions.iter().all(|&(start, len, off)| {
        len > 0
            && len % PAGE == 0
            && off % PAGE == 0
            && start.checked_add(len).is_some()
            && off.checked_add(len).is_some_and(|end| end <= size)
            && usize::try_from(len).is_ok()
    });
    if !fits || regions.is_empty() {
        return Err(MemoryError::Regions(regions.to_vec(), size));
    }
    let ranges = regions
        .iter()
        .map(|&(start, len, off)| {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            Ok((
                GuestAddress(start),
                len as usize,
                Some(vm_memory::FileOffset::new(file, off)),
            ))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    Ok(GuestMemoryMmap::from_ranges_with_files(&ranges)?)
}

/// Hands every region of `mem` to KVM, one memory slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Register {
                slot,
                err: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size`
        // bytes owned by `mem`, which outlives the VM (both live in `Vm`,
        // and the vCPUs stop before it is dropped).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|err| MemoryError::Register { slot, err })?;
    }
    Ok(())
}

/// Hands `rom`'s single region to KVM as memory slot `slot`, read-only
/// where KVM supports it (guest writes then exit as MMIO and vanish).
pub fn register_rom(
    vm: &VmFd,
    rom: &GuestMemoryMmap,
    slot: u32,
    read_only: bool,
) -> Result<(), MemoryError> {
    for region in rom.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Register {
                slot,
                err: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: as in `register`: `rom` lives in `Vm` as long as the VM.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|err| MemoryError::Register { slot, err })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_is_all_low() {
        let l = RamLayout::new(64 << 20).unwrap();
        assert_eq!(l.ranges(), vec![(0, 64 << 20)]);
    }

    #[test]
    fn big_vm_splits_around_the_gap() {
        let l = RamLayout::new(4 << 30).unwrap();
        assert_eq!(
            l.ranges(),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn rejects_tiny_and_unaligned() {
        assert!(matches!(
            RamLayout::new(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(matches!(
            RamLayout::new((64 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
    }
}
