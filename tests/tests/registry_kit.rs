//! The registry kit (`moat_e2e::registry`) against a real `docker-registry`
//! with skopeo and plain HTTP, no moat server: images built with umoci carry
//! their config to the registry in OCI and Docker form; Basic auth refuses
//! anonymous clients; token auth hands anonymous clients pull-only tokens
//! that read but cannot push; hostile raw layers survive byte for byte; the
//! two-platform index lists both platforms; the `docker save` tarball
//! matches the layout and skopeo reads it.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flate2::read::GzDecoder;
use moat_e2e::registry::{
    busybox_rootfs, docker_archive, inspect, push, sha256_digest, try_push, two_platform_index,
    upload, Auth, Compression, Format, ImageBuilder, Layout, RawTar, Registry, TokenGrant,
    TOKEN_SERVICE,
};
use serde_json::Value;

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent.get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut reply = request.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Reply {
        status: reply.status().as_u16(),
        headers: reply
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body: reply
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("read body"),
    }
}

/// busybox in one layer, `/app/hello.txt` in a second.
fn app_image(trees: &Path) -> ImageBuilder {
    let base = trees.join("base");
    let app = trees.join("app");
    busybox_rootfs(&base);
    fs::create_dir_all(app.join("app")).expect("mkdir app");
    fs::write(app.join("app/hello.txt"), "hello\n").expect("write hello.txt");
    ImageBuilder::new()
        .dir(&base)
        .dir(&app)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("GREETING", "hello world")
        .workdir("/app")
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["cat hello.txt"])
        .user("nobody")
}

fn config_of(registry: &Registry, reference: &str) -> Value {
    inspect(registry, registry.credentials(), reference, &["--config"]).expect("inspect --config")
        ["config"]
        .clone()
}

#[test]
fn umoci_image_reaches_the_registry_with_its_config_in_oci_and_docker_form() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let built = app_image(work.path()).build(&layout, "v1");
    assert_eq!(built.layers.len(), 2, "one layer per rootfs directory");

    let digest = push(&layout, "v1", &registry, "kit/app:oci", Format::Oci);
    assert_eq!(digest, built.manifest.digest, "OCI push keeps the digest");
    let info = inspect(&registry, None, "kit/app:oci", &[]).expect("inspect");
    assert_eq!(info["Digest"], built.manifest.digest.as_str());
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    let env: Vec<&str> = info["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"GREETING=hello world"), "{env:?}");
    let config = config_of(&registry, "kit/app:oci");
    assert_eq!(config["WorkingDir"], "/app");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(config["Cmd"], serde_json::json!(["cat hello.txt"]));
    assert_eq!(config["User"], "nobody");

    // Plain HTTP with every manifest type accepted, as a client must send.
    let manifest = get(
        &format!("{}/v2/kit/app/manifests/oci", registry.url()),
        &[("Accept", ACCEPT)],
    );
    assert_eq!(manifest.status, 200);
    assert_eq!(
        manifest.header("docker-content-digest"),
        built.manifest.digest
    );
    assert_eq!(sha256_digest(&manifest.body), built.manifest.digest);

    let docker_digest = push(&layout, "v1", &registry, "kit/app:docker", Format::Docker);
    assert_ne!(docker_digest, built.manifest.digest, "converted manifest");
    let raw = inspect(&registry, None, "kit/app:docker", &["--raw"]).expect("inspect --raw");
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        raw["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let config = config_of(&registry, "kit/app:docker");
    assert_eq!(config["WorkingDir"], "/app");
    assert_eq!(config["User"], "nobody");
}

#[test]
fn basic_auth_registry_refuses_anonymous_clients() {
    let registry = Registry::start(Auth::basic("alice", "s3cret"));
    assert_eq!(registry.credentials(), Some(("alice", "s3cret")));
    let v2 = get(&format!("{}/v2/", registry.url()), &[]);
    assert_eq!(v2.status, 401);
    assert!(
        v2.header("www-authenticate").starts_with("Basic "),
        "{:?}",
        v2.headers
    );

    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let built = app_image(work.path()).build(&layout, "v1");
    let refused = try_push(&layout, "v1", &registry, "kit/app:v1", Format::Oci, None);
    assert!(refused.is_err(), "anonymous push accepted");
    let wrong = Some(("alice", "wrong"));
    assert!(try_push(&layout, "v1", &registry, "kit/app:v1", Format::Oci, wrong).is_err());

    assert_eq!(
        push(&layout, "v1", &registry, "kit/app:v1", Format::Oci),
        built.manifest.digest
    );
    assert_eq!(
        upload(&layout, "v1", &registry, "kit/uploaded:v1"),
        built.manifest.digest
    );
    assert!(inspect(&registry, None, "kit/app:v1", &[]).is_err());
    let info = inspect(&registry, registry.credentials(), "kit/app:v1", &[]).expect("inspect");
    assert_eq!(info["Digest"], built.manifest.digest.as_str());
}

/// `Bearer realm="...",service="...",scope="..."` -> its parameters.
fn challenge(header: &str) -> Vec<(String, String)> {
    let params = header.strip_prefix("Bearer ").expect("Bearer challenge");
    params
        .split("\",")
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn token_auth_gives_anonymous_clients_pull_only_tokens() {
    let registry = Registry::start(Auth::token("bob", "hunter2"));
    let realm = registry.token_url().expect("token server");
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let built = app_image(work.path()).build(&layout, "v1");

    // The user's push goes through the token flow.
    push(&layout, "v1", &registry, "kit/app:v1", Format::Oci);
    let grants = registry.token_grants();
    assert!(
        grants.iter().any(|g| g.user.as_deref() == Some("bob")
            && g.access
                .iter()
                .any(|(name, actions)| name == "kit/app" && actions.contains(&"push".to_string()))),
        "no push token for bob: {grants:?}"
    );

    // Anonymous pull by hand, as a registry client does it.
    let url = format!("{}/v2/kit/app/manifests/v1", registry.url());
    let first = get(&url, &[("Accept", ACCEPT)]);
    assert_eq!(first.status, 401);
    let params = challenge(first.header("www-authenticate"));
    let param = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in challenge {params:?}"))
    };
    assert_eq!(param("realm"), realm);
    assert_eq!(param("service"), TOKEN_SERVICE);
    assert_eq!(param("scope"), "repository:kit/app:pull");
    let token_reply = get(
        &format!("{realm}?service={TOKEN_SERVICE}&scope=repository%3Akit%2Fapp%3Apull%2Cpush"),
        &[],
    );
    assert_eq!(token_reply.status, 200);
    let token = token_reply.json()["token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(token_reply.json()["access_token"], token.as_str());
    assert_eq!(
        registry.token_grants().last(),
        Some(&TokenGrant {
            user: None,
            access: vec![("kit/app".into(), vec!["pull".into()])],
        }),
        "anonymous asked for pull,push and got pull"
    );
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = format!("Bearer {}", String::from_utf8(forged).expect("ASCII"));
    let refused = get(&url, &[("Accept", ACCEPT), ("Authorization", &forged)]);
    assert_eq!(refused.status, 401, "a token with a bad signature");
    let bearer = format!("Bearer {token}");
    let second = get(&url, &[("Accept", ACCEPT), ("Authorization", &bearer)]);
    assert_eq!(second.status, 200, "{}", registry.log_text());
    assert_eq!(sha256_digest(&second.body), built.manifest.digest);
    let info = inspect(&registry, None, "kit/app:v1", &[]).expect("anonymous inspect");
    assert_eq!(info["Digest"], built.manifest.digest.as_str());

    let uploaded = upload(&layout, "v1", &registry, "kit/uploaded:v1");
    assert_eq!(
        uploaded, built.manifest.digest,
        "upload through a push token"
    );

    let wrong = get(
        &format!("{realm}?service={TOKEN_SERVICE}&scope=repository:kit/app:pull"),
        &[("Authorization", "Basic Ym9iOndyb25n")],
    );
    assert_eq!(wrong.status, 401, "bob:wrong");
    let refused = try_push(&layout, "v1", &registry, "kit/other:v1", Format::Oci, None);
    let error = refused.expect_err("anonymous push accepted");
    assert!(
        error.contains("denied") || error.contains("unauthorized"),
        "{error}"
    );
}

fn hostile_tar() -> Vec<u8> {
    RawTar::new()
        .file("../escape", 0o644, b"out\n")
        .file("/etc/absolute", 0o644, b"abs\n")
        .symlink("link", "/etc")
        .file("link/through", 0o644, b"through\n")
        .hardlink("hard", "../escape")
        .char_device("dev/null2", 1, 3)
        .block_device("dev/sda9", 8, 9)
        .dir("opaque", 0o755)
        .opaque("opaque")
        .whiteout("bin/busybox")
        .finish()
}

/// Each entry's name as stored, with ` -> TARGET` for links.
fn entry_names(tar: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar);
    let entries = archive.entries().expect("tar entries");
    entries
        .map(|e| {
            let e = e.expect("entry");
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            match e.link_name_bytes() {
                Some(target) => format!("{name} -> {}", String::from_utf8_lossy(&target)),
                None => name,
            }
        })
        .collect()
}

#[test]
fn raw_layers_keep_hostile_entries_byte_for_byte() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("temp dir");
    let base = work.path().join("base");
    busybox_rootfs(&base);
    let tar = hostile_tar();
    assert_eq!(
        entry_names(&tar),
        [
            "../escape",
            "/etc/absolute",
            "link -> /etc",
            "link/through",
            "hard -> ../escape",
            "dev/null2",
            "dev/sda9",
            "opaque",
            "opaque/.wh..wh..opq",
            "bin/.wh.busybox"
        ]
    );
    let layout = work.path().join("layout");
    let built = ImageBuilder::new()
        .dir(&base)
        .raw_layer(tar.clone(), Compression::Gzip)
        .raw_layer(tar.clone(), Compression::None)
        .cmd(&["/bin/sh"])
        .build(&layout, "hostile");
    assert_eq!(built.layers.len(), 3);
    let oci = Layout::open(&layout);
    let config = oci.read_json(&built.config.digest);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), 3);
    assert_eq!(diff_ids[1], sha256_digest(&tar).as_str());
    assert_eq!(diff_ids[2], sha256_digest(&tar).as_str());
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert!(built.layers[1].media_type.ends_with("tar+gzip"));
    assert_eq!(
        built.layers[2].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(oci.read_blob(&built.layers[2].digest), tar);

    // skopeo gzips the uncompressed layer on the way: a new manifest.
    let pushed = push(
        &layout,
        "hostile",
        &registry,
        "kit/hostile:skopeo",
        Format::Oci,
    );
    assert_ne!(pushed, built.manifest.digest);
    let raw = inspect(&registry, None, "kit/hostile:skopeo", &["--raw"]).expect("inspect --raw");
    assert_eq!(raw["layers"][1]["digest"], built.layers[1].digest.as_str());
    assert_eq!(
        raw["layers"][2]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        gunzip(&blob(&registry, "kit/hostile", &raw["layers"][2])),
        tar
    );

    // upload keeps every byte.
    let uploaded = upload(&layout, "hostile", &registry, "kit/hostile:v1");
    assert_eq!(uploaded, built.manifest.digest);
    let info = inspect(&registry, None, "kit/hostile:v1", &[]).expect("inspect");
    assert_eq!(info["Digest"], built.manifest.digest.as_str());
    for layer in &built.layers {
        let pulled = blob(&registry, "kit/hostile", &layer.to_json());
        assert_eq!(pulled, oci.read_blob(&layer.digest), "{layer:?}");
    }
}

/// The blob `layer` (a descriptor) of repository `name`.
fn blob(registry: &Registry, name: &str, layer: &Value) -> Vec<u8> {
    let digest = layer["digest"].as_str().expect("digest");
    let reply = get(&format!("{}/v2/{name}/blobs/{digest}", registry.url()), &[]);
    assert_eq!(reply.status, 200, "GET blob {digest}");
    reply.body
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    GzDecoder::new(gz).read_to_end(&mut tar).expect("gunzip");
    tar
}

#[test]
fn two_platform_index_lists_both_platforms() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let built = two_platform_index(&layout, "multi");
    let platforms: Vec<&str> = built
        .manifests
        .iter()
        .map(|(p, _)| p.architecture.as_str())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
    let index_json: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("read index.json"))
            .expect("index.json");
    assert_eq!(index_json["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        index_json["manifests"][0]["digest"],
        built.index.digest.as_str()
    );

    let digest = push(&layout, "multi", &registry, "kit/multi:v1", Format::Oci);
    assert_eq!(digest, built.index.digest);
    let raw = inspect(&registry, None, "kit/multi:v1", &["--raw"]).expect("inspect --raw");
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let listed: Vec<(String, String)> = raw["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                m["digest"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = built
        .manifests
        .iter()
        .map(|(p, d)| (p.architecture.clone(), d.digest.clone()))
        .collect();
    assert_eq!(listed, expected);
    for (platform, manifest) in &built.manifests {
        let reference = format!("kit/multi@{}", manifest.digest);
        let info = inspect(&registry, None, &reference, &[]).expect("inspect one platform");
        assert_eq!(info["Architecture"], platform.architecture.as_str());
        let layer = serde_json::json!({ "digest": info["Layers"][0] });
        let tar = gunzip(&blob(&registry, "kit/multi", &layer));
        let mut archive = tar::Archive::new(&tar[..]);
        let mut found = None;
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            if entry.path().expect("path").as_os_str() == "platform" {
                let mut text = String::new();
                entry.read_to_string(&mut text).expect("read /platform");
                found = Some(text);
            }
        }
        assert_eq!(found, Some(format!("{}\n", platform.architecture)));
    }

    let list = push(
        &layout,
        "multi",
        &registry,
        "kit/multi:docker",
        Format::Docker,
    );
    let raw = inspect(&registry, None, "kit/multi:docker", &["--raw"]).expect("inspect --raw");
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(raw["manifests"].as_array().map(Vec::len), Some(2));
    assert_ne!(list, built.index.digest);
}

#[test]
fn docker_save_tarball_matches_the_layout() {
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let built = app_image(work.path())
        .raw_layer(hostile_tar(), Compression::Gzip)
        .build(&layout, "v1");
    let archive = work.path().join("image.tar");
    docker_archive(&layout, "v1", "kit/app:v1", &archive);

    let mut files = std::collections::BTreeMap::new();
    let bytes = fs::read(&archive).expect("read archive");
    for entry in tar::Archive::new(&bytes[..]).entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let name = entry.path().expect("path").display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read entry");
        files.insert(name, data);
    }
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
    let image = &manifest[0];
    assert_eq!(image["RepoTags"], serde_json::json!(["kit/app:v1"]));
    let config_name = image["Config"].as_str().expect("Config");
    assert_eq!(
        format!("sha256:{}", config_name.trim_end_matches(".json")),
        built.config.digest
    );
    assert_eq!(sha256_digest(&files[config_name]), built.config.digest);
    let config: Value = serde_json::from_slice(&files[config_name]).expect("config");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let layers = image["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), 3);
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let data = &files[layer.as_str().expect("layer path")];
        assert_eq!(sha256_digest(data), diff_id.as_str().expect("diff_id"));
    }
    assert_eq!(files[layers[2].as_str().expect("path")], hostile_tar());
    for umoci_layer in &layers[..2] {
        let data = &files[umoci_layer.as_str().expect("path")];
        assert_eq!(data.len() % 512, 0, "{umoci_layer}: whole tar blocks");
        assert!(
            data[data.len() - 1024..].iter().all(|b| *b == 0),
            "{umoci_layer}: end-of-archive blocks"
        );
    }
    let repositories: Value = serde_json::from_slice(&files["repositories"]).expect("repositories");
    assert!(repositories["kit/app"]["v1"].is_string(), "{repositories}");

    // skopeo reads it as a docker-archive.
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "inspect", "--config"])
        .arg(format!("docker-archive:{}", archive.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).expect("skopeo JSON");
    assert_eq!(read["config"]["WorkingDir"], "/app");
    assert_eq!(read["rootfs"]["diff_ids"], config["rootfs"]["diff_ids"]);
}
