//! Image references as Docker resolves them: `python:3.12-slim` is
//! `docker.io/library/python:3.12-slim`, a first component with a `.` or `:`
//! (or `localhost`) names the registry, a missing tag is `latest`, and
//! `@sha256:…` pins the content (it wins over a tag).

use super::digest::Digest;

/// Docker Hub's name and the host its API lives on.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest repository name (registry + path) Docker accepts.
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

/// A parsed, normalised reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    /// `library/python`, `org/img`, ...
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError {
            reference: s.chars().take(300).collect(),
            reason: reason.to_owned(),
        };
        if s.is_empty() || s.len() > 512 {
            return Err(err("must be 1-512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| err(&e.to_string()))?)),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let mut chars = t.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !first_ok
                || t.len() > 128
                || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                return Err(err(
                    "the tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        check_registry(&registry).map_err(|r| err(&r))?;
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        check_repository(&repository).map_err(|r| err(&r))?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(err("the name is longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry API is served on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl std::fmt::Display for Reference {
    /// The fully qualified form: `docker.io/library/python:3.12@sha256:…`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("registry {r:?} is not a valid host[:port]"))
    }
}

/// Path components: lowercase letters and digits, separated by `.`, `_`,
/// `__` or runs of `-`.
fn check_repository(path: &str) -> Result<(), String> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| {
                x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-')
            })
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("._")
            && !c.contains("_.")
    };
    if path.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(format!(
            "repository {path:?} must be lowercase letters and digits separated by '.', '_', '__', '-' or '/'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn short_names_resolve_as_docker_does() {
        assert_eq!(parsed("python"), "docker.io/library/python:latest");
        assert_eq!(
            parsed("python:3.12-slim"),
            "docker.io/library/python:3.12-slim"
        );
        assert_eq!(
            parsed("microsandbox/python"),
            "docker.io/microsandbox/python:latest"
        );
        assert_eq!(
            parsed("index.docker.io/library/alpine:3"),
            "docker.io/library/alpine:3"
        );
        assert_eq!(parsed("ghcr.io/org/img:v1"), "ghcr.io/org/img:v1");
        assert_eq!(
            parsed("localhost:5000/a/b/c"),
            "localhost:5000/a/b/c:latest"
        );
        assert_eq!(parsed("localhost/x"), "localhost/x:latest");
        assert_eq!(parsed("127.0.0.1:5000/x:1.0"), "127.0.0.1:5000/x:1.0");
        let r = Reference::parse("python:3.12-slim").unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_reference(), "3.12-slim");
    }

    #[test]
    fn digests_pin_and_win_over_tags() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = Reference::parse(&format!("ghcr.io/org/img@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), d);
        let r = Reference::parse(&format!("img:1@{d}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/img:1@{d}"));
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Python",
            "python:",
            "python:-x",
            "python@sha256:abc",
            "a//b",
            "../etc",
            "host:99999/x",
            "python:3.12:slim",
            "ex ample/x",
            "x/",
            "a..b/c",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("x/{}", "a".repeat(300));
        assert!(Reference::parse(&long).is_err());
    }
}
