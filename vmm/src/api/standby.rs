//! Standby: a VMM process started ahead of need, waiting for a snapshot
//! to restore; the platform's warm pool.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_api::{Command, Reply, MAX_LINE};

use super::Error;

/// What a standby VMM was asked to restore.
pub type Request = (PathBuf, Option<PathBuf>, UnixListener, UnixStream);

/// Binds `sock`, answers `ping` and waits for a client to send
/// [`Command::Restore`]. Returns the snapshot and working-set paths, the
/// listener (to keep serving control commands) and the client (told
/// [`Reply::Running`] once restored).
pub fn wait_for_restore(sock: &Path) -> Result<Request, Error> {
    let name = sock.display().to_string();
    let listener = super::bind(sock)?;
    listener
        .set_nonblocking(false)
        .map_err(|e| Error::Socket(name.clone(), e))?;
    loop {
        let (mut client, _) = listener
            .accept()
            .map_err(|e| Error::Socket(name.clone(), e))?;
        let mut line = String::new();
        let read = BufReader::new(Read::take(&client, MAX_LINE as u64)).read_line(&mut line);
        let reply = match read.map(|_| Command::parse(&line)) {
            Ok(Ok(Command::Restore {
                snapshot,
                working_set,
            })) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|e| Error::Socket(name.clone(), e))?;
                return Ok((snapshot, working_set, listener, client));
            }
            Ok(Ok(Command::Ping)) => Reply::Standby,
            _ => Reply::Error("standby: expected `restore <snapshot>`".into()),
        };
        let _ = writeln!(client, "{reply}");
    }
}
