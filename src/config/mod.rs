//! Kairos cloud-config: loading, merging, defaults and validation.
