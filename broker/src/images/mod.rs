//! OCI images: references, the registry client, the content-addressed
//! store, the layer unpacker and the boot disks sandboxes run from. Every
//! byte of an image is hostile input: blobs are verified against their
//! digests while they stream, layers are applied beneath a directory fd
//! without following anything the archive planted, and every size is capped.

pub mod unpack;
