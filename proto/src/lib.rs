//! moat's wire contracts, generated at build time from `proto/*.proto`.
//!
//! - [`broker`]: the gRPC service between gateway and broker (with the `grpc`
//!   feature, also the tonic client and server).
//! - [`state`]: the broker's durable sandbox records.
//! - [`agent`]: the frames between broker and guest agent, and [`frame`], the
//!   length-prefixed codec both sides use.

pub mod frame;
pub mod languages;
pub mod names;

/// Broker <-> gateway messages (package `moat.broker.v1`).
pub mod broker {
    include!(concat!(env!("OUT_DIR"), "/moat.broker.v1.rs"));
}

/// The broker's durable per-sandbox records (package `moat.state.v1`).
pub mod state {
    include!(concat!(env!("OUT_DIR"), "/moat.state.v1.rs"));

    /// Layout version of [`SandboxRecord`] this build writes and reads.
    pub const RECORD_FORMAT: u32 = 1;
}

/// Broker <-> guest agent messages (package `moat.agent.v1`).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/moat.agent.v1.rs"));

    /// Version of the agent protocol this build speaks.
    pub const PROTOCOL_VERSION: u32 = 1;

    /// Name of the virtio-serial port that carries the agent channel.
    pub const PORT_NAME: &str = "moat.agent";

    /// The vsock port the agent listens on when the VMM offers vsock
    /// instead of virtio-serial (the libkrun backend).
    pub const VSOCK_PORT: u32 = 1024;

    /// Kernel command-line word that tells the agent to listen on vsock
    /// (`MOAT_AGENT_VSOCK=<port>`) instead of opening the serial port.
    pub const VSOCK_VAR: &str = "MOAT_AGENT_VSOCK";
}
