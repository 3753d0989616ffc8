//! Fuzzes the per-sandbox DNS responder's decision on one datagram (what a
//! hostile guest sends to port 53): nothing may panic; a local reply always
//! carries the query's ID with QR set and never outgrows a UDP DNS message;
//! a query is forwarded upstream only when forwarding is allowed, and then
//! unchanged.

#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use moat_broker::network::dns::{respond, Action, PeerLookup};

struct Peers;

impl PeerLookup for Peers {
    fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        (name == "db" || name == "web-1").then_some(Ipv4Addr::new(10, 213, 0, 6))
    }
}

fuzz_target!(|data: &[u8]| {
    for forward in [false, true] {
        match respond(data, &Peers, forward) {
            Action::Drop => {}
            Action::Reply(reply) => {
                assert!(reply.len() >= 12, "a reply has a header");
                assert!(reply.len() <= 512 + 16, "reply of {} bytes", reply.len());
                assert_eq!(reply[..2], data[..2], "the reply keeps the query's ID");
                assert!(reply[2] & 0x80 != 0, "QR set");
            }
            Action::Forward(q) => {
                assert!(forward, "forwarded without permission");
                assert_eq!(q.id, u16::from_be_bytes([data[0], data[1]]));
            }
        }
    }
});
