//! Platform code, grouped as Firecracker's `arch` is: only x86_64 here.

pub mod x86_64;
