//! image-tools.
