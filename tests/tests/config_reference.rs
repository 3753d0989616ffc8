//! `docs/configuration.md` names every key both daemons accept: the field
//! lists come from the config structs' own `Deserialize` impls (what
//! `deny_unknown_fields` checks against), so a key added to the code and
//! not to the reference fails here.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut Vec<&'static str>);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        self.0.extend_from_slice(fields);
        Err(Stop)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

fn fields<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
    let mut names = Vec::new();
    let _ = T::deserialize(FieldNames(&mut names));
    assert!(
        !names.is_empty(),
        "{} has no fields",
        std::any::type_name::<T>()
    );
    names
}

fn reference() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .expect("docs/configuration.md")
}

/// Every `prefix.field` (or bare field at the top level, skipping the
/// names of tables, which are the prefixes' first words) must appear in
/// backticks in the reference.
fn missing(doc: &str, tables: &[(&str, Vec<&'static str>)]) -> Vec<String> {
    let table_names: Vec<&str> = tables
        .iter()
        .filter_map(|(prefix, _)| prefix.split('.').next())
        .filter(|t| !t.is_empty())
        .collect();
    let mut missing = Vec::new();
    for (prefix, names) in tables {
        for name in names {
            if prefix.is_empty() && table_names.contains(name) {
                continue;
            }
            let key = if prefix.is_empty() {
                (*name).to_string()
            } else {
                format!("{prefix}.{name}")
            };
            // A map-valued key (`images.local`) is documented by its
            // entries (`images.local.<name>`).
            if !doc.contains(&format!("`{key}`")) && !doc.contains(&format!("`{key}.")) {
                missing.push(key);
            }
        }
    }
    missing
}

#[test]
fn every_broker_key_is_in_the_reference() {
    use moat_broker::config::*;
    let tables = [
        ("", fields::<BrokerConfig>()),
        ("boot", fields::<BootConfig>()),
        ("images", fields::<ImagesConfig>()),
        ("vmm", fields::<VmmConfig>()),
        ("limits", fields::<Limits>()),
        ("sandbox_ids", fields::<IdRange>()),
        ("cgroups", fields::<CgroupConfig>()),
        ("testing", fields::<TestingConfig>()),
        ("jail", fields::<JailConfig>()),
        ("volumes", fields::<VolumesConfig>()),
        ("network", fields::<NetworkConfig>()),
        ("lifecycle", fields::<LifecycleConfig>()),
        ("lifecycle.namespaces.<ns>", fields::<NamespaceLifetimes>()),
        ("pool", fields::<PoolConfig>()),
        ("pool.entries[]", fields::<PoolEntry>()),
        (
            "registries.<host>",
            fields::<moat_broker::images::registry::RegistryConfig>(),
        ),
    ];
    let doc = reference();
    let missing = missing(&doc, &tables);
    assert!(
        missing.is_empty(),
        "broker keys missing from docs/configuration.md: {missing:?}"
    );
    assert!(doc.contains("`images.local.<name>`"));
}

#[test]
fn every_gateway_key_is_in_the_reference() {
    use moat_gateway::config::*;
    let tables = [
        ("", fields::<Config>()),
        ("auth", fields::<AuthConfig>()),
        ("limits", fields::<Limits>()),
        ("timeouts", fields::<Timeouts>()),
        ("http", fields::<HttpConfig>()),
        ("log", fields::<LogConfig>()),
        ("metrics", fields::<MetricsConfig>()),
    ];
    let doc = reference();
    // The gateway's half of the reference only.
    let gateway = doc
        .split_once("## /etc/moat/gateway.toml")
        .map(|(_, g)| g)
        .expect("a gateway section");
    let missing = missing(gateway, &tables);
    assert!(
        missing.is_empty(),
        "gateway keys missing from docs/configuration.md: {missing:?}"
    );
}
