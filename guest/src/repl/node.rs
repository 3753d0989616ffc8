//! Node.js sessions: `node -e <driver.js>` (`nodejs` when there is no
//! `node`). Cells run through the `repl` module's eval in the global context,
//! so top-level `await` and `let`/`const`/`function` declarations persist,
//! and SIGINT interrupts synchronous loops and pending awaits. Uncaught errors
//! and unhandled rejections during a cell make it an error.

use super::Flavor;

/// The Node.js flavor.
pub static NODE: Flavor = Flavor {
    name: "nodejs",
    programs: &["node", "nodejs"],
    args: &["-e"],
    driver: include_str!("driver.js"),
    missing: "Node.js (node) is not installed in this sandbox's image; use an image with \
              Node.js (e.g. microsandbox/node)",
};
