//! Legacy PC devices: the serial console and the i8042 reset path.

pub mod console_log;
pub mod i8042;
pub mod serial;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use i8042::{I8042State, I8042};
pub use serial::SerialConsole;
use serial::SerialConsoleState;

/// The legacy devices, kept for snapshots and console input.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The i8042 reset controller.
    pub i8042: Arc<Mutex<I8042>>,
}

/// Saved legacy device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
}

impl LegacyDevices {
    /// Their state, for a snapshot.
    pub fn save(&self) -> LegacyState {
        LegacyState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
