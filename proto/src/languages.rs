//! REPL language names the wire contract accepts, and the session each one
//! runs in. Both the gateway and the broker check names with this one table.

/// Accepted name -> session language.
pub const LANGUAGES: [(&str, &str); 4] = [
    ("python", "python"),
    ("nodejs", "nodejs"),
    ("node", "nodejs"),
    ("javascript", "nodejs"),
];

/// The session language for an accepted name (`node` -> `nodejs`).
pub fn session_language(name: &str) -> Option<&'static str> {
    LANGUAGES.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// The accepted names, for error messages.
pub fn accepted() -> String {
    LANGUAGES.map(|(n, _)| n).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_two_sessions() {
        assert_eq!(session_language("python"), Some("python"));
        assert_eq!(session_language("javascript"), Some("nodejs"));
        assert_eq!(session_language("ruby"), None);
        assert_eq!(accepted(), "python, nodejs, node, javascript");
    }
}
