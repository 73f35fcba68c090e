//! The CPUID each vCPU sees: what KVM supports on this host, with the
//! topology made to match the VM (APIC ids 0..N-1, one thread per core,
//! all cores in one package) and the hypervisor bit set.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
#[error("KVM_GET_SUPPORTED_CPUID: {0}")]
pub struct CpuidError(#[from] kvm_ioctls::Error);

/// KVM's supported CPUID, the base every vCPU's table is made from.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    Ok(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: EBX[23:16] holds a valid logical processor count.
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits of APIC id needed to number `n` cores.
fn id_bits(n: u32) -> u32 {
    match n {
        0 | 1 => 0,
        n => 32 - (n - 1).leading_zeros(),
    }
}

/// A copy of `base` describing vCPU `id` of `count`.
pub fn for_vcpu(base: &CpuId, id: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, [23:16] logical CPUs in the
                // package; keep the CLFLUSH size and brand index below.
                e.ebx = (e.ebx & 0xffff) | (id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_CACHE_PARAMS => {
                // The host's core and cache-sharing counts are not ours:
                // EAX[31:26] cores per package - 1; EAX[25:14] threads
                // sharing this cache - 1 (none below L3, all at L3).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    count.saturating_sub(1)
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff)
                    | ((count.saturating_sub(1) & 0x3f) << 26)
                    | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // EDX: this CPU's x2APIC id. Subleaf 0 is the thread level
                // (one thread per core), subleaf 1 the core level (all our
                // CPUs); anything further is an invalid level.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_SMT << 8;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0808_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_counts() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
            .unwrap();
        let c = for_vcpu(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx), (3, 1, 0x100));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (2, 4, 0x201));
        assert_eq!((e[3].ebx, e[3].ecx), (0, 2));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(64), 6);
    }
}
