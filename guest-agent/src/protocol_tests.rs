use super::*;
use crate::report::LineBuf;

fn encode(msg: impl fmt::Display) -> Vec<u8> {
    LineBuf::<{ MAX_LINE }>::line(msg).as_bytes().to_vec()
}

#[test]
fn agent_messages_round_trip() {
    let cases = [
        (AgentMsg::Hello { version: VERSION }, "HELLO 1\n"),
        (AgentMsg::Ready, "READY\n"),
        (AgentMsg::Resumed, "RESUMED\n"),
        (AgentMsg::Exit(ExitStatus::Exited(3)), "EXIT status=3\n"),
        (AgentMsg::Exit(ExitStatus::Signaled(9)), "EXIT signal=9\n"),
        (AgentMsg::Pong { nonce: b"abc-1" }, "PONG abc-1\n"),
    ];
    for (msg, text) in cases {
        let line = encode(msg);
        assert_eq!(line, text.as_bytes(), "{msg:?}");
        assert_eq!(AgentMsg::parse(&line), Ok(msg), "{text}");
    }
}

#[test]
fn host_messages_round_trip() {
    let ping = HostMsg::Ping { nonce: b"7" };
    assert_eq!(encode(ping), b"PING 7\n");
    assert_eq!(HostMsg::parse(b"PING 7\n"), Ok(ping));
    let restored = HostMsg::Restored {
        unix_ns: 1_700_000_000_123_456_789,
        entropy: Entropy::from_bytes(&[0x00, 0xab, 0xff]),
    };
    let line = encode(restored);
    assert_eq!(line, b"RESTORED 1700000000123456789 00abff\n");
    assert_eq!(HostMsg::parse(&line), Ok(restored));
    match HostMsg::parse(b"RESTORED 5 0A0b") {
        Ok(HostMsg::Restored { unix_ns, entropy }) => {
            assert_eq!(unix_ns, 5);
            assert_eq!(entropy.as_bytes(), [0x0a, 0x0b]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_lines_are_errors_not_panics() {
    for bad in [
        &b"HELLO"[..],
        b"HELLO x",
        b"HELLO 99999999999",
        b"READY now",
        b"EXIT",
        b"EXIT status=256",
        b"EXIT code=1",
        b"EXIT status=",
        b"PONG",
        b"PONG ",
        b"PONG a b",
    ] {
        assert_eq!(
            AgentMsg::parse(bad),
            Err(ProtocolError::BadArgs),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(AgentMsg::parse(b"HI"), Err(ProtocolError::Unknown));
    assert_eq!(AgentMsg::parse(b""), Err(ProtocolError::Unknown));
    for bad in [
        &b"PING"[..],
        b"PING \x01",
        b"RESTORED",
        b"RESTORED 1",
        b"RESTORED x 00",
        b"RESTORED 1 0",
        b"RESTORED 1 zz",
        b"RESTORED 99999999999999999999 00",
    ] {
        assert_eq!(
            HostMsg::parse(bad),
            Err(ProtocolError::BadArgs),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long_hex = "ab".repeat(MAX_ENTROPY + 1);
    assert_eq!(
        HostMsg::parse(format!("RESTORED 1 {long_hex}").as_bytes()),
        Err(ProtocolError::BadArgs)
    );
    let nonce = "n".repeat(MAX_NONCE + 1);
    assert_eq!(
        HostMsg::parse(format!("PING {nonce}").as_bytes()),
        Err(ProtocolError::BadArgs)
    );
    assert_eq!(
        HostMsg::parse("x".repeat(MAX_LINE).as_bytes()),
        Err(ProtocolError::TooLong)
    );
    assert_eq!(HostMsg::parse(b"PONG 1"), Err(ProtocolError::Unknown));
}

#[test]
fn line_reader_splits_a_stream() {
    let mut r = LineReader::new();
    assert_eq!(r.push(b"PING 1\nPI"), 9);
    assert_eq!(r.next_line(), Some(Ok(&b"PING 1"[..])));
    assert_eq!(r.next_line(), None);
    r.push(b"NG 2\n\n");
    assert_eq!(r.next_line(), Some(Ok(&b"PING 2"[..])));
    assert_eq!(r.next_line(), Some(Ok(&b""[..])));
    assert_eq!(r.next_line(), None);
}

#[test]
fn line_reader_drops_overlong_lines_once() {
    let mut r = LineReader::new();
    let long = vec![b'x'; MAX_LINE * 3];
    let mut rest = &long[..];
    let mut errors = 0;
    while !rest.is_empty() {
        let n = r.push(rest);
        rest = &rest[n..];
        while let Some(line) = r.next_line() {
            assert!(line.is_err());
            errors += 1;
        }
    }
    r.push(b"\nPING 3\n");
    assert_eq!(r.next_line(), Some(Err(ProtocolError::TooLong)));
    errors += 1;
    assert_eq!(r.next_line(), Some(Ok(&b"PING 3"[..])));
    assert_eq!(errors, 1);
}

/// A peer that sends 64 MiB without a newline: the reader's buffer is the
/// same fixed array throughout, it says `overlong` from the `MAX_LINE`th
/// byte on (when the host cuts the peer off), never yields a line, and
/// reports the line once when it finally ends.
#[test]
fn line_reader_stays_bounded_under_64_mib_without_a_newline() {
    assert!(core::mem::size_of::<LineReader>() < 2 * MAX_LINE);
    let mut r = LineReader::new();
    let chunk = vec![b'x'; 64 * 1024];
    assert_eq!(r.push(&chunk[..MAX_LINE - 1]), MAX_LINE - 1);
    assert!(!r.overlong(), "a line may still end within MAX_LINE");
    let mut fed = MAX_LINE - 1;
    while fed < 64 << 20 {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let n = r.push(rest);
            assert!(n > 0, "the reader always takes bytes");
            rest = &rest[n..];
            fed += n;
            assert_eq!(r.next_line(), None, "after {fed} bytes");
            assert_eq!(r.overlong(), fed >= MAX_LINE, "after {fed} bytes");
        }
    }
    let n = r.push(b"\nREADY\n");
    assert_eq!(r.next_line(), Some(Err(ProtocolError::TooLong)));
    assert!(!r.overlong());
    if n < 7 {
        assert_eq!(r.next_line(), None);
        r.push(&b"\nREADY\n"[n..]);
    }
    assert_eq!(r.next_line(), Some(Ok(&b"READY"[..])));
    assert_eq!(r.next_line(), None);
    assert!(!r.overlong());
}

#[test]
fn a_full_buffer_of_whole_lines_is_not_overlong() {
    let mut r = LineReader::new();
    let mut lines = vec![b'a'; MAX_LINE];
    lines[MAX_LINE / 2] = b'\n';
    assert_eq!(r.push(&lines), MAX_LINE);
    assert!(!r.overlong());
    assert_eq!(
        r.next_line().map(|l| l.map(<[u8]>::len)),
        Some(Ok(MAX_LINE / 2))
    );
    assert_eq!(r.next_line(), None);
    assert!(
        !r.overlong(),
        "half a line is pending, with room for the rest"
    );
}
