//! `moat server keygen` and `moat server revoke`: API keys for the gateway.
//! keygen signs a key with the gateway's secret file (which the operator,
//! as root, may read; it is never printed) and prints it; revoke appends a
//! key id to the revocation list the gateway re-reads without a restart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use moat_gateway::auth::{revocation, secret, Signer};
use moat_gateway::config::{Config as GatewayConfig, DEFAULT_CONFIG_FILE};

/// Longest key lifetime keygen accepts.
const MAX_EXPIRY: Duration = Duration::from_secs(10 * 366 * 86_400);

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Namespace the key may use; repeat for several, or '*' for all.
    #[arg(long = "namespace", short = 'n', required = true)]
    namespaces: Vec<String>,
    /// Lifetime: a number with a unit, s/m/h/d/w/y (e.g. 90d, 12h).
    #[arg(long, value_parser = parse_duration)]
    expire: Duration,
    /// Gateway config naming the secret file.
    #[arg(long, env = "MOAT_GATEWAY_CONFIG")]
    gateway_config: Option<PathBuf>,
    /// Secret file (overrides the gateway config's auth.secret_file).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Print {"key", "key_id", "namespaces", "expires_at"} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The key id (printed by keygen; the key's `jti` claim).
    key_id: String,
    /// Gateway config naming the revocation file.
    #[arg(long, env = "MOAT_GATEWAY_CONFIG")]
    gateway_config: Option<PathBuf>,
    /// Revocation file (overrides the gateway config's auth.revocation_file).
    #[arg(long)]
    revocation_file: Option<PathBuf>,
}

/// The gateway config: the file named, else the default file when it
/// exists, else the defaults.
pub fn gateway_config(path: Option<&PathBuf>) -> Result<(GatewayConfig, Option<PathBuf>)> {
    let path = match path {
        Some(path) => Some(path.clone()),
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        }
    };
    match path {
        Some(path) => Ok((GatewayConfig::load(&path)?, Some(path))),
        None => Ok((GatewayConfig::default(), None)),
    }
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    let (config, _) = gateway_config(args.gateway_config.as_ref())?;
    let path = args.secret_file.unwrap_or(config.auth.secret_file);
    let secret = secret::load(&path).with_context(|| {
        format!(
            "cannot read the signing secret {} (`moat server start` creates it at first start; \
             keygen must run as root or as the gateway's user)",
            path.display()
        )
    })?;
    if args.expire > MAX_EXPIRY {
        bail!("--expire: at most 10 years");
    }
    let (token, claims) = Signer::from_secret(&secret)
        .issue(&args.namespaces, args.expire)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "key": token,
                "key_id": claims.jti,
                "namespaces": claims.namespaces,
                "expires_at": claims.exp,
            })
        );
    } else {
        println!("{token}");
    }
    eprintln!(
        "moat: key {} for namespaces [{}], expires at {} (seconds since 1970); \
         revoke with `moat server revoke {}`",
        claims.jti,
        claims.namespaces.join(", "),
        claims.exp,
        claims.jti
    );
    Ok(())
}

pub fn revoke(args: RevokeArgs) -> Result<()> {
    let (config, _) = gateway_config(args.gateway_config.as_ref())?;
    let path = args.revocation_file.unwrap_or(config.auth.revocation_file);
    revocation::append(&path, &args.key_id, "revoked by moat server revoke")
        .with_context(|| format!("cannot revoke {} in {}", args.key_id, path.display()))?;
    eprintln!(
        "moat: key {} revoked (in {}); the gateway refuses it within {} s",
        args.key_id,
        path.display(),
        config.auth.revocation_poll_secs
    );
    Ok(())
}

/// `90d`, `12h`, `30m`, `45s`, `2w`, `1y`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: s, m, h, d, w or y (e.g. 90d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number then a unit, e.g. 90d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use s, m, h, d, w or y"
            ))
        }
    };
    if n == 0 {
        return Err("the lifetime must be more than zero".to_owned());
    }
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1y"), Ok(Duration::from_secs(365 * 86_400)));
        for bad in [
            "",
            "10",
            "d",
            "0d",
            "5x",
            "-1d",
            "1.5h",
            "99999999999999999999y",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keygen_signs_with_the_secret_and_revoke_appends() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("s");
        secret::ensure(&secret_file, None).unwrap();
        keygen(KeygenArgs {
            namespaces: vec!["a".into()],
            expire: Duration::from_secs(60),
            gateway_config: None,
            secret_file: Some(secret_file.clone()),
            json: true,
        })
        .unwrap();
        let bad = keygen(KeygenArgs {
            namespaces: vec!["../a".into()],
            expire: Duration::from_secs(60),
            gateway_config: None,
            secret_file: Some(secret_file),
            json: false,
        });
        assert!(bad.is_err());
        let list = dir.path().join("revoked");
        revoke(RevokeArgs {
            key_id: "abc123".into(),
            gateway_config: None,
            revocation_file: Some(list.clone()),
        })
        .unwrap();
        assert!(std::fs::read_to_string(&list)
            .unwrap()
            .starts_with("abc123 "));
        assert!(revoke(RevokeArgs {
            key_id: "bad id".into(),
            gateway_config: None,
            revocation_file: Some(list),
        })
        .is_err());
    }
}
