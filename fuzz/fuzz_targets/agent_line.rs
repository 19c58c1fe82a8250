//! The guest agent's line protocol as the host reads it: a byte stream
//! from the guest, read in chunks of any size into the bounded
//! `LineReader`, split into lines, parsed as agent messages; and the lines
//! the host writes back.
//!
//! Input: a byte that seeds the read sizes and picks the reader's mode
//! (the host's, which closes the channel on an overlong line, or one that
//! drains it), then the stream.
//!
//! What must hold: the reader gives exactly the stream's lines, in order,
//! an overlong one (MAX_LINE bytes or more before its newline) as one
//! `TooLong`; it reports `overlong` exactly while the unfinished line has
//! reached MAX_LINE bytes; a parsed message prints as the line that
//! parses back to it; every host line fits MAX_LINE and parses back.

#![no_main]

use guest_agent::protocol::{AgentMsg, Entropy, HostMsg, LineReader, ProtocolError, MAX_LINE};
use libfuzzer_sys::fuzz_target;

/// The stream's complete lines as the reader must give them.
fn expected_lines(stream: &[u8]) -> Vec<Result<&[u8], ProtocolError>> {
    let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    // What follows the last newline is not a line yet.
    lines.pop();
    lines
        .into_iter()
        .map(|l| {
            if l.len() < MAX_LINE {
                Ok(l)
            } else {
                Err(ProtocolError::TooLong)
            }
        })
        .collect()
}

fn check_agent_line(line: &[u8]) {
    if let Ok(msg) = AgentMsg::parse(line) {
        let printed = msg.to_string();
        assert!(printed.len() < MAX_LINE, "{printed:?}");
        assert_eq!(AgentMsg::parse(printed.as_bytes()), Ok(msg), "{printed:?}");
    }
}

/// The lines the host sends: `RESTORED` with any clock and entropy,
/// `PING` with any nonce the agent accepts.
fn check_host_lines(stream: &[u8]) {
    let (clock, rest) = stream.split_at(stream.len().min(8));
    let mut ns = [0u8; 8];
    ns[..clock.len()].copy_from_slice(clock);
    // The host always sends some entropy (16 bytes); the protocol has no
    // line for none.
    let entropy = if rest.is_empty() { &[0u8][..] } else { rest };
    let restored = HostMsg::Restored {
        unix_ns: u64::from_le_bytes(ns),
        entropy: Entropy::from_bytes(entropy),
    };
    let nonce: Vec<u8> = rest
        .iter()
        .copied()
        .filter(u8::is_ascii_graphic)
        .take(64)
        .collect();
    let ping = (!nonce.is_empty()).then_some(HostMsg::Ping { nonce: &nonce });
    for msg in std::iter::once(restored).chain(ping) {
        let line = format!("{msg}\n");
        assert!(line.len() <= MAX_LINE, "{line:?}");
        assert_eq!(HostMsg::parse(line.as_bytes()), Ok(msg), "{line:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let host_mode = seed & 1 == 0;
    let expected = expected_lines(stream);
    let mut got = 0;
    let mut reader = LineReader::new();
    let mut fed = 0;
    let mut size = u32::from(seed) | 1;
    while fed < stream.len() {
        // Reads of 1 to 300 bytes, as a socket may return them.
        size = size.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let want = 1 + (size >> 16) as usize % 300;
        let spare = reader.spare();
        let n = want.min(spare.len()).min(stream.len() - fed);
        spare[..n].copy_from_slice(&stream[fed..fed + n]);
        reader.filled(n);
        fed += n;
        while let Some(line) = reader.next_line() {
            let want = expected.get(got).copied();
            assert_eq!(line, want.expect("no more lines in the stream"));
            if let Ok(line) = line {
                check_agent_line(line);
            }
            got += 1;
        }
        let unfinished = stream[..fed]
            .iter()
            .rev()
            .take_while(|&&b| b != b'\n')
            .count();
        assert_eq!(
            reader.overlong(),
            unfinished >= MAX_LINE,
            "{unfinished} bytes since the last newline"
        );
        if host_mode && reader.overlong() {
            // The host closes the channel here.
            return;
        }
    }
    assert_eq!(got, expected.len(), "lines left in the reader");
    check_host_lines(stream);
});
