//! Runs the switch-root plan of [`guest_agent::rootfs`]: the system calls
//! that put a disk image, under an overlay, at `/`.

use guest_agent::mounts::EEXIST;
use guest_agent::rootfs::Step;

use crate::sys::{self, Errno};

/// Runs `steps` in order; returns the failing step's name and errno.
pub fn run(steps: &[Step]) -> Result<(), (&'static str, i32)> {
    for step in steps {
        let result = match step {
            Step::Mkdir(path) => match sys::mkdir(path, 0o755) {
                Err(Errno(errno)) if errno != EEXIST => Err(("mkdir", errno)),
                _ => Ok(()),
            },
            Step::Mount(m) => {
                sys::mount(&m.source, &m.target, &m.fstype, m.flags, m.data.as_deref())
                    .map_err(|Errno(errno)| (m.what, errno))
            }
            Step::Chdir(path) => sys::chdir(path).map_err(|Errno(errno)| ("chdir", errno)),
            Step::Chroot(path) => sys::chroot(path).map_err(|Errno(errno)| ("chroot", errno)),
        };
        result?;
    }
    Ok(())
}
