//! The userspace network stack's guest-frame handler: arbitrary Ethernet
//! frames (ARP, IPv4, TCP, UDP, ICMP, garbage) from a hostile guest.
//!
//! Input: frames, each behind its length (u16 LE); the stack polls after
//! each one. Outbound connections and DNS are denied so that no input makes
//! the fuzzer open host sockets; a denied DNS query is answered REFUSED,
//! so the query parser that builds that answer is fuzzed too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use little_fuzz::deny_all_net;
use vmm::usernet::test_utils::arp_request;
use vmm::usernet::{Stack, GATEWAY_IP};

fuzz_target!(|data: &[u8]| {
    let Ok(mut stack) = Stack::new(&deny_all_net()) else {
        return;
    };
    // Let the stack know the guest's MAC so that replies are built.
    stack.guest_frame(&arp_request(GATEWAY_IP));
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let n = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        stack.guest_frame(&tail[..n]);
        stack.poll();
        rest = &tail[n..];
    }
    let _ = stack.poll_delay();
    stack.to_guest().clear();
});
