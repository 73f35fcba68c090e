//! Legacy PC devices on the port-I/O bus: the 16550 serial port, CMOS/RTC,
//! the i8042 (reset line only), the ACPI PM1a registers, QEMU's fw_cfg
//! and debug console ports.

pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod power;
pub mod serial;
