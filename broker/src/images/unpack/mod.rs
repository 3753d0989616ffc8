//! Layer unpacker (being written).
