//! JSON nesting depth, measured on the raw bytes before parsing, so a body
//! of ten thousand `[` costs a linear scan and not a recursive parse.

/// Whether `body`'s arrays and objects nest deeper than `max`. Brackets
/// inside strings do not count; invalid JSON is left to the parser.
pub fn exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nesting_outside_strings() {
        assert!(!exceeds(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(exceeds(br#"{"a":[1,{"b":[2]}]}"#, 3));
        assert!(!exceeds(br#"{"a":"[[[[[[[[\"[[[["}"#, 1));
        assert!(exceeds(&b"[".repeat(10_000), 32));
        assert!(!exceeds(b"[][][][]", 1));
    }
}
