//! Reaching a running handler's snapshot hooks from a test, the way the
//! control socket does: from another handler on the same loop.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Event, EventHandler, HandlerId, LoopHandle, Ops};

/// What [`save_handler`] saw: whether every other handler was quiescent,
/// and what the target's [`EventHandler::save`] returned.
pub type Saved = (bool, Option<Vec<u8>>);

struct Probe {
    evt: EventFd,
    target: HandlerId,
    tx: Sender<Saved>,
}

impl EventHandler for Probe {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.evt.as_raw_fd(), 0, libc::POLLIN as u32);
    }

    fn handle(&mut self, _event: Event, ops: &mut Ops<'_>) {
        let _ = self.evt.read();
        ops.unwatch(0);
        let _ = self
            .tx
            .send((ops.all_quiescent(), ops.save_handler(self.target)));
    }
}

/// Asks the loop behind `handle` for handler `target`'s snapshot state.
///
/// # Panics
/// If the loop does not answer within five seconds.
pub fn save_handler(handle: &LoopHandle, target: HandlerId) -> Saved {
    let (tx, rx) = mpsc::channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    evt.write(1).expect("eventfd write");
    let id = handle
        .add(Box::new(Probe { evt, target, tx }))
        .expect("loop running");
    let saved = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the loop answers");
    let _ = handle.remove(id);
    saved
}
