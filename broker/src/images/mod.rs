//! OCI images: references, the registry client, the content-addressed
//! store, the layer unpacker and the boot disks sandboxes run from. Every
//! byte of an image is hostile input: blobs are verified against their
//! digests while they stream, layers are applied beneath a directory fd
//! without following anything the archive planted, and every size is capped.
//!
//! `reference` (names as Docker resolves them) → `registry` + `auth` (the
//! distribution protocol) → `store` (blobs, names, locks, gc) → `manifest`
//! (what manifests, indexes and configs may say) → `unpack` (layers onto a
//! staging tree) → `bootdisk` (erofs) ; `import` (OCI layouts, `docker
//! save` tarballs) ; `service` ties them together for the broker and CLI.

pub mod auth;
pub mod bootdisk;
pub mod digest;
pub mod error;
pub mod import;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod service;
pub mod store;
pub mod unpack;

pub use error::ImageError;
pub use reference::Reference;
pub use service::{ImageLimits, Images, Progress, ProgressFn, ReadyImage};
pub use store::{RefRecord, Store};
