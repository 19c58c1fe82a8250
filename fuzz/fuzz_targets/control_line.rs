//! The VMM control socket's parsers (`vmm_api`): any line is a command or
//! a reply, or an error, never a panic; what parses formats back to a line
//! that parses to the same command, or to a reply of the same kind.
//!
//! Input: one line, as the VMM or the platform would read it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_api::{Command, Reply, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(command) = Command::parse(&line) {
        let again = Command::parse(&command.to_string());
        assert_eq!(again.as_ref(), Ok(&command), "{line:?}");
    }
    if let Ok(reply) = Reply::parse(&line) {
        let text = reply.to_string();
        assert!(text.len() < MAX_LINE && !text.contains('\n'), "{line:?}");
        let again = Reply::parse(&text).expect("a formatted reply parses");
        assert_eq!(
            std::mem::discriminant(&again),
            std::mem::discriminant(&reply),
            "{line:?}"
        );
    }
});
