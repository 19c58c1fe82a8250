//! The `syscall` instruction itself.
//!
//! x86-64 Linux convention: number in rax, arguments in rdi, rsi, rdx,
//! r10, r8, r9; the result comes back in rax; the kernel clobbers rcx and
//! r11 and nothing else.

use core::arch::asm;

/// A system call without arguments.
///
/// # Safety
/// The call must not violate memory safety: `nr` must be a call whose
/// (absent) arguments imply no memory access by the kernel on the caller's
/// behalf.
#[inline(always)]
pub unsafe fn syscall0(nr: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the call's memory effects; the asm
    // declares every register the kernel clobbers.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// A system call with one argument.
///
/// # Safety
/// Every pointer among the arguments must be valid for what the kernel
/// does with it during the call.
#[inline(always)]
pub unsafe fn syscall1(nr: usize, a1: usize) -> isize {
    let ret: isize;
    // SAFETY: as for syscall0, with the caller vouching for a1.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// A system call with two arguments.
///
/// # Safety
/// As [`syscall1`].
#[inline(always)]
pub unsafe fn syscall2(nr: usize, a1: usize, a2: usize) -> isize {
    let ret: isize;
    // SAFETY: as for syscall0, with the caller vouching for the arguments.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// A system call with three arguments.
///
/// # Safety
/// As [`syscall1`].
#[inline(always)]
pub unsafe fn syscall3(nr: usize, a1: usize, a2: usize, a3: usize) -> isize {
    let ret: isize;
    // SAFETY: as for syscall0, with the caller vouching for the arguments.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// A system call with four arguments.
///
/// # Safety
/// As [`syscall1`].
#[inline(always)]
pub unsafe fn syscall4(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    // SAFETY: as for syscall0, with the caller vouching for the arguments.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             in("r10") a4, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// A system call with five arguments.
///
/// # Safety
/// As [`syscall1`].
#[inline(always)]
pub unsafe fn syscall5(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize) -> isize {
    let ret: isize;
    // SAFETY: as for syscall0, with the caller vouching for the arguments.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             in("r10") a4, in("r8") a5, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// `exit`-family call that never returns.
///
/// # Safety
/// `nr` must be a call that ends the thread or process.
#[inline(always)]
pub unsafe fn exit(nr: usize, code: usize) -> ! {
    // SAFETY: the caller guarantees the call does not return, matching
    // `noreturn`.
    unsafe {
        asm!("syscall", in("rax") nr, in("rdi") code, options(noreturn, nostack));
    }
}

/// `clone(flags, stack_top)` whose child calls `entry(arg)` on the new
/// stack; returns the child's pid (or -errno) in the parent.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned end of writable memory reserved
/// for the child, unused by anyone else until the child execs or exits
/// (with CLONE_VFORK the parent sleeps until then), and `entry` must never
/// return. With CLONE_VM the child shares all memory: `entry` must not
/// touch what the parent relies on.
pub unsafe fn clone_vfork(
    flags: usize,
    stack_top: usize,
    entry: extern "C" fn(usize) -> !,
    arg: usize,
) -> isize {
    const CLONE: usize = 56;
    let ret: isize;
    // SAFETY: in the parent this is an ordinary syscall (rcx, r11
    // clobbered). The child starts with the parent's registers but rsp =
    // stack_top and rax = 0: it moves arg (r12) into rdi and calls entry
    // (r13) on its own stack, aligned as the ABI requires (rsp = 16n - 8 at
    // entry); entry never returns, and `ud2` traps if it did. The caller
    // vouches for the stack and entry.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") CLONE as isize => ret,
            in("rdi") flags,
            in("rsi") stack_top,
            in("rdx") 0usize,
            in("r10") 0usize,
            in("r8") 0usize,
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}
