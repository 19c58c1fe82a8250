//! little.cloud image tools: everything that turns user input into a root
//! filesystem a guest boots from.
//!
//! - [`initramfs`]: the newc cpio archives the guest kernel unpacks into its
//!   root, used to inject the guest agent and small test root filesystems.
//! - [`store`]: `little-image import`: OCI layouts, OCI and `docker save`
//!   archives, registries ([`registry`]) into a content-addressed local
//!   store of read-only erofs base images.
//! - [`oci`]: image documents; [`layer`] and [`tree`]: layers flattened
//!   into an in-memory index; [`erofs`]: the base image writer;
//!   [`runconfig`]: what the guest agent runs, its config file and the
//!   initramfs that carries it.

// CONTRIBUTING.md: no unwrap() outside tests; tests may unwrap.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod docker_config;
pub mod erofs;
pub mod initramfs;
pub mod layer;
pub mod oci;
pub mod registry;
pub mod runconfig;
pub mod store;
pub mod tarbound;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod tree;
