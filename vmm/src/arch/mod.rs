//! Architecture-specific code. little.cloud targets x86_64 hosts.

pub mod x86_64;
