//! Legacy PC devices: the serial console and the i8042 reset path.

pub mod i8042;
pub mod serial;
