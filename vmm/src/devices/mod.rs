//! Devices emulated in the VMM itself: only what a guest needs to boot,
//! print, keep time and power off. Disk and network live in vhost-user backends.

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod rtc;
pub mod serial;

pub use bus::{Bus, BusDevice};
