//! The CPUID each vCPU sees: what KVM supports on this host, with the
//! topology made to match the VM (APIC ids 0..N-1, one thread per core,
//! all cores in one package, the last-level cache shared by all) and the
//! hypervisor bit set.
//!
//! KVM's supported table is no topology at all: leaf 0xB has only an
//! all-zero subleaf 0, and the AMD leaves (0x8000_0008, 0x8000_001D,
//! 0x8000_001E) carry the host's counts or zeros. Guests read the topology
//! from different leaves (Linux on Intel: 0xB/0x1F, else 1 and 4; on AMD:
//! 0x8000_0008, 0x8000_001E, then 0xB), so each one is set here, and the
//! extended-topology leaves are rebuilt with every subleaf a guest walks.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Supported(#[from] kvm_ioctls::Error),
    #[error("the vCPU's CPUID table has too many entries: {0:?}")]
    TooMany(vmm_sys_util::fam::Error),
}

/// KVM's supported CPUID, the base every vCPU's table is made from.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    Ok(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

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

/// Threads sharing a cache of `level` (EAX[7:5] of leaf 4 and
/// 0x8000_001D), minus one: none below L3, all CPUs at L3.
fn cache_sharing(eax: u32, count: u32) -> u32 {
    if (eax >> 5) & 0x7 >= 3 {
        count.saturating_sub(1)
    } else {
        0
    }
}

/// Subleaves 0 (threads: one per core), 1 (cores: all `count`) and 2
/// (invalid, ends the walk) of extended-topology leaf `function` for the
/// vCPU with x2APIC id `id`.
fn topology_leaf(function: u32, id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax, ebx, ecx| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: id,
        ..Default::default()
    };
    [
        sub(0, 0, 1, LEVEL_SMT << 8),
        sub(1, id_bits(count), count, (LEVEL_CORE << 8) | 1),
        sub(2, 0, 0, 2),
    ]
}

/// A copy of `base` describing vCPU `id` of `count`.
pub fn for_vcpu(base: &CpuId, id: u32, count: u32) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::new();
    let mut topology_leaves = Vec::new();
    for e in base.as_slice() {
        let mut e = *e;
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
            // A leaf 4 subleaf with cache type 0 ends the list: left alone.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                // EAX[31:26] cores per package - 1; [25:14] threads
                // sharing this cache - 1.
                e.eax = (e.eax & 0x3fff)
                    | ((count.saturating_sub(1) & 0x3f) << 26)
                    | ((cache_sharing(e.eax, count) & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // Rebuilt below, whatever subleaves KVM listed.
                if !topology_leaves.contains(&e.function) {
                    topology_leaves.push(e.function);
                }
                continue;
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0] cores in the package - 1, [15:12] APIC id bits
                // for the core number.
                e.ecx =
                    (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (id_bits(count) << 12);
            }
            LEAF_AMD_CACHE if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & !(0xfff << 14)) | ((cache_sharing(e.eax, count) & 0xfff) << 14);
            }
            LEAF_AMD_TOPOLOGY => {
                // EAX extended APIC id; EBX[7:0] core id, [15:8] threads
                // per core - 1; ECX[7:0] node id, [10:8] nodes - 1.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        entries.push(e);
    }
    for function in topology_leaves {
        entries.extend(topology_leaf(function, id, count));
    }
    CpuId::from_entries(&entries).map_err(CpuidError::TooMany)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0808_0800,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    #[test]
    fn apic_ids_and_counts() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
            .unwrap();
        let c = for_vcpu(&base, 3, 4).unwrap();
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let t = |i| {
            let e = find(&c, 0xb, i);
            (e.eax, e.ebx, e.ecx, e.edx)
        };
        assert_eq!(t(0), (0, 1, 0x100, 3));
        assert_eq!(t(1), (2, 4, 0x201, 3));
        assert_eq!(t(2), (0, 0, 2, 3));
        assert_eq!(c.as_slice().len(), 4);
    }

    /// KVM here lists leaf 0xB with subleaf 0 only (all zero): the core
    /// level must still be there, or Linux sees one package per CPU.
    #[test]
    fn missing_topology_subleaves_are_added() {
        let mut b = entry(0xb, 0);
        b.ebx = 0;
        b.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let base = CpuId::from_entries(&[entry(1, 0), b]).unwrap();
        let c = for_vcpu(&base, 1, 4).unwrap();
        for i in 0..3 {
            let e = find(&c, 0xb, i);
            assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            assert_eq!(e.edx, 1);
        }
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 4, 0x201));
        // No 0x1F in the base: none added.
        assert!(c.as_slice().iter().all(|e| e.function != 0x1f));
    }

    /// What Linux reads on an AMD host: the core count and APIC id bits
    /// in 0x8000_0008, the core id in 0x8000_001E, the L3 shared by all.
    #[test]
    fn amd_topology_leaves() {
        let mut sizes = entry(LEAF_AMD_SIZES, 0);
        sizes.ecx = 0x7001; // host: 2 cores, 7 APIC id bits
        let mut l1 = entry(LEAF_AMD_CACHE, 0);
        l1.eax = 0x121;
        let mut l3 = entry(LEAF_AMD_CACHE, 3);
        l3.eax = 0x4163; // host: 2 threads share it
        let base = CpuId::from_entries(&[sizes, l1, l3, entry(LEAF_AMD_TOPOLOGY, 0)]).unwrap();
        let c = for_vcpu(&base, 2, 4).unwrap();
        assert_eq!(find(&c, LEAF_AMD_SIZES, 0).ecx, 0x2003);
        assert_eq!(find(&c, LEAF_AMD_CACHE, 0).eax, 0x121);
        assert_eq!(find(&c, LEAF_AMD_CACHE, 3).eax, 0x163 | (3 << 14));
        let t = find(&c, LEAF_AMD_TOPOLOGY, 0);
        assert_eq!((t.eax, t.ebx, t.ecx), (2, 2, 0));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(64), 6);
    }
}
