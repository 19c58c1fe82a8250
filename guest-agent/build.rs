//! Link the `guest-agent` binary as a static executable with no C runtime:
//! no crt1.o start files (the binary has its own `_start`), no libc or
//! libgcc, no PIE (so no dynamic section, no interpreter, no self-
//! relocation), unused sections dropped. Release builds are also stripped.
//! These flags apply to the binary only: the library and its tests link
//! normally.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let mut args = vec![
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--gc-sections",
        "-Wl,--build-id=none",
    ];
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        args.push("-Wl,--strip-all");
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
