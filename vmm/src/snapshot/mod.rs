//! Snapshots: save a paused microVM to one file and restore any number of
//! copy-on-write clones from it.

pub mod format;
pub mod memory;
