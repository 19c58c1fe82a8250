//! The console reporter: [`Event`]s become `little-agent: ...` lines on
//! stderr, which for PID 1 is `/dev/console`.

use crate::sys;
use guest_agent::report::{Event, LineBuf};

/// Where reports go today; a vsock reporter will sit beside it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Console {
    /// Print progress and skipped steps too.
    pub verbose: bool,
}

impl Console {
    /// Prints `event` if it is always shown or verbose mode is on. Errors
    /// are returned for the one caller that cares (no console at all);
    /// others ignore them, having nowhere else to report.
    pub fn report(self, event: Event<'_>) -> sys::Result<()> {
        if event.always_shown() || self.verbose {
            // One write per line keeps lines whole on a shared console.
            sys::write_all(2, LineBuf::<512>::line(event).as_bytes())
        } else {
            Ok(())
        }
    }
}
