//! The handler's queue work without an event loop, for fuzz targets and
//! benches: transmit chains into a stack, the stack's frames into receive
//! chains, exactly as the handler runs them on a notification.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queues::QueueError;
use crate::devices::virtio::Interrupt;
use crate::usernet::Stack;

/// Pops up to `budget` transmit chains from `tx`, hands their frames to
/// `stack` and returns the chains used; whether the budget ran out.
pub fn process_tx(
    mem: &GuestMemoryMmap,
    tx: &mut Queue,
    stack: &mut Stack,
    interrupt: &Interrupt,
    budget: usize,
) -> Result<bool, QueueError> {
    super::handler::process_tx(mem, tx, stack, interrupt, budget)
}

/// Moves `stack`'s frames for the guest into receive chains of `rx` while
/// the guest has chains there.
pub fn process_rx(
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
    stack: &mut Stack,
    interrupt: &Interrupt,
) -> Result<(), QueueError> {
    super::handler::process_rx(mem, rx, stack, interrupt)
}
