//! `guest-agent`: little.cloud's PID 1, a static binary with neither the
//! Rust standard library nor a libc.
//!
//! `_start` hands the initial stack to [`rust_start`]; as PID 1 the agent
//! boots the guest ([`init`]), otherwise it offers the host test modes
//! ([`host`]). The logic lives in the `guest_agent` library; this crate
//! holds the system calls and the process plumbing.

#![no_std]
#![no_main]

extern crate alloc;

mod console;
mod copy_tree;
mod heap;
mod host;
mod init;
mod ready;
mod spawn;
mod supervise;
mod switch_root;
mod sys;
mod volumes;
mod vsock;

use core::panic::PanicInfo;
use guest_agent::report::{LineBuf, PREFIX};

#[global_allocator]
static ALLOCATOR: heap::Bump = heap::Bump::new();

// The kernel starts the process with rsp pointing at argc, then argv[],
// NULL, envp[], NULL, auxv. rsp is 16-byte aligned here; `call` then
// leaves rust_start with the alignment the ABI expects.
core::arch::global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "    xor ebp, ebp",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {entry}",
    "    ud2",
    entry = sym rust_start,
);

/// Rust entry: `sp` is the initial stack pointer.
extern "C" fn rust_start(sp: *const usize) -> ! {
    if sys::getpid() == 1 {
        init::main()
    }
    // SAFETY: the kernel's initial stack starts with argc (a usize)
    // followed by argc argv pointers; sp points at it.
    let (argc, argv) = unsafe { (*sp, sp.add(1).cast::<*const u8>()) };
    let args = host::args(argc, argv);
    sys::exit(host::main(&args))
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let line = LineBuf::<256>::line(format_args!("{PREFIX}panic: {}", info.message()));
    let _ = sys::write_all(2, line.as_bytes());
    if sys::getpid() == 1 {
        init::restart(console::Console::default())
    }
    sys::exit(101)
}
