//! x86_64 platform code: the guest physical layout, the boot protocols
//! and their GDT and page tables, the MP table and the vCPUs' CPUID.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
