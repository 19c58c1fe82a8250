//! Links the `vmm` binary as a position-dependent executable.
//!
//! Thousands of VMM processes run from one binary. As a PIE, every process
//! applies the binary's relative relocations at load and so writes its own
//! private copy of the relocated read-only data (`.data.rel.ro`, ~76 KiB
//! here). Linked `-no-pie`, the linker resolves those relocations once and
//! the pages stay clean and shared through the page cache.

fn main() {
    println!("cargo:rustc-link-arg-bin=vmm=-no-pie");
}
