//! MCP (Model Context Protocol) at `/mcp`, streamable HTTP transport:
//! [`transport`] speaks HTTP (POST messages, GET 405, DELETE ends a
//! session), [`session`] keeps `Mcp-Session-Id` sessions, [`protocol`]
//! answers `initialize` (version negotiation), `ping` and dispatches,
//! [`tools`] maps the five sandbox tools onto the JSON-RPC actions, and
//! [`prompts`] serves the two prompt templates. Authentication, Origin and
//! per-key limits are `crate::guard`'s, as for `/api/v1/rpc`.

pub mod prompts;
pub mod protocol;
pub mod session;
pub mod tools;
pub mod transport;

/// Protocol versions this server speaks, newest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// The newest version, offered when a client asks for one we do not speak.
pub const LATEST_VERSION: &str = SUPPORTED_VERSIONS[0];

/// The version to use when a client asks for `requested`.
pub fn negotiate(requested: &str) -> &'static str {
    SUPPORTED_VERSIONS
        .iter()
        .find(|v| **v == requested)
        .copied()
        .unwrap_or(LATEST_VERSION)
}

/// Whether `version` has tool output schemas, titles and structured
/// content (2025-06-18 and later; the versions are ISO dates).
pub fn has_structured_output(version: &str) -> bool {
    version >= "2025-06-18"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_echoes_supported_and_offers_latest_otherwise() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(negotiate(v), v);
        }
        assert_eq!(negotiate("2099-01-01"), "2025-11-25");
        assert_eq!(negotiate("1.0"), "2025-11-25");
        assert!(has_structured_output("2025-11-25"));
        assert!(has_structured_output("2025-06-18"));
        assert!(!has_structured_output("2025-03-26"));
        assert!(!has_structured_output("2024-11-05"));
    }
}
