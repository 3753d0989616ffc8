//! moat-broker: the privileged half of moat. It serves the gateway's gRPC
//! requests on a Unix socket, re-validates each one, and runs every sandbox
//! as a microVM in its own jailed process.
//!
//! Layout: `server` (socket + peer check) → `service` (gRPC handlers) →
//! `sandbox` (registry, lifecycle, commands) → `vmm` (backends build the VM
//! process's command line) + `jail` (spawns it confined) + `cgroups` +
//! `disk` + `agent` (the guest channel) + `console`; `volumes` resolves
//! host directories a sandbox asks for.

pub mod agent;
pub mod cgroups;
pub mod config;
pub mod console;
pub mod disk;
pub mod error;
pub mod images;
pub mod initramfs;
pub mod jail;
pub mod network;
pub mod privileges;
pub mod quota;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod slots;
pub mod state;
pub mod vm_socket;
pub mod vmm;
pub mod volumes;
