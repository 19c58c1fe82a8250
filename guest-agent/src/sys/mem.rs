//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` and `strlen` (used by
//! `CStr::from_ptr`): the compiler emits
//! calls to these and there is no libc to provide them. Also
//! `_Unwind_Resume` and `rust_eh_personality`, which the precompiled
//! `alloc` references from landing pads that `panic = "abort"` never
//! reaches.
//!
//! They are written in assembly so that the compiler cannot recognise a
//! Rust loop as "a memcpy" and compile it into a call to itself. `rep
//! movsb`/`rep stosb` are fast on every CPU with ERMS and fine elsewhere
//! for the small copies the agent makes.

core::arch::global_asm!(
    ".pushsection .text.memcpy,\"ax\",@progbits",
    ".globl memcpy",
    ".type memcpy,@function",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    ".size memcpy, . - memcpy",
    ".popsection",
    //
    // Copies backwards when the destination starts inside the source.
    ".pushsection .text.memmove,\"ax\",@progbits",
    ".globl memmove",
    ".type memmove,@function",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    mov r8, rdi",
    "    sub r8, rsi",
    "    cmp r8, rdx",
    "    jb 2f",
    "    rep movsb",
    "    ret",
    "2:",
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    ".size memmove, . - memmove",
    ".popsection",
    //
    ".pushsection .text.memset,\"ax\",@progbits",
    ".globl memset",
    ".type memset,@function",
    "memset:",
    "    mov r8, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r8",
    "    ret",
    ".size memset, . - memset",
    ".popsection",
    //
    // memcmp returns the difference of the first differing bytes (as
    // unsigned chars); bcmp only needs zero/non-zero, so it is the same.
    ".pushsection .text.memcmp,\"ax\",@progbits",
    ".globl memcmp",
    ".type memcmp,@function",
    ".globl bcmp",
    ".type bcmp,@function",
    "memcmp:",
    "bcmp:",
    "    xor eax, eax",
    "    test rdx, rdx",
    "    jz 4f",
    "3:",
    "    movzx eax, byte ptr [rdi]",
    "    movzx ecx, byte ptr [rsi]",
    "    sub eax, ecx",
    "    jnz 4f",
    "    inc rdi",
    "    inc rsi",
    "    dec rdx",
    "    jnz 3b",
    "4:",
    "    ret",
    ".size memcmp, . - memcmp",
    ".size bcmp, . - bcmp",
    ".popsection",
    //
    ".pushsection .text.strlen,\"ax\",@progbits",
    ".globl strlen",
    ".type strlen,@function",
    "strlen:",
    "    mov rax, rdi",
    "5:",
    "    cmp byte ptr [rax], 0",
    "    je 6f",
    "    inc rax",
    "    jmp 5b",
    "6:",
    "    sub rax, rdi",
    "    ret",
    ".size strlen, . - strlen",
    ".popsection",
    //
    // Nothing unwinds under panic = "abort"; trap if something ever does.
    ".pushsection .text._Unwind_Resume,\"ax\",@progbits",
    ".globl _Unwind_Resume",
    ".type _Unwind_Resume,@function",
    ".globl rust_eh_personality",
    ".type rust_eh_personality,@function",
    "_Unwind_Resume:",
    "rust_eh_personality:",
    "    ud2",
    ".size _Unwind_Resume, . - _Unwind_Resume",
    ".size rust_eh_personality, . - rust_eh_personality",
    ".popsection",
);
