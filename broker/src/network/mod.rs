//! Guest networking: each sandbox with a NIC gets a tap device on the host
//! (`tap`), an address pair from the operator's subnet (`addressing`), the
//! nftables rules that enforce its scope (`firewall`), a DNS responder on
//! its host-side address (`dns`) and its published ports (`ports`).

pub mod dns;
pub mod firewall;
pub mod ports;
