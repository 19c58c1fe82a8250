#![allow(missing_docs)] // criterion_group! generates undocumented items.
//! Host-side cost of preparing a VM up to its first KVM_RUN: KVM VM and vCPU
//! creation, guest memory, ELF kernel load, boot structures, devices.

use criterion::{criterion_group, criterion_main, Criterion};
use vmm::builder;
use vmm::config::{ConsoleOutput, VmConfig};

fn vm_setup(c: &mut Criterion) {
    let kernel = perf::default_kernel();
    if !kernel.exists() {
        eprintln!(
            "vm_setup: skipped, no kernel at {} (run guest-kernel/build.sh)",
            kernel.display()
        );
        return;
    }
    let host = vmm::host::HostKind::detect();
    c.bench_function(
        &format!("vm_setup_to_first_kvm_run/128MiB/host={}", host.name()),
        |b| {
            b.iter(|| {
                let mut config = VmConfig::new(&kernel);
                config.console = ConsoleOutput::Null;
                builder::build(config).expect("VM builds")
            })
        },
    );
}

criterion_group!(benches, vm_setup);
criterion_main!(benches);
