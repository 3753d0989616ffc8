//! OCI images end to end: a real registry on loopback (no auth, Basic,
//! bearer tokens), images built by the tests, pulled by tag, by digest and
//! through a multi-platform index, imported from a layout and a `docker
//! save` archive, booted, with their config applied and layer semantics
//! intact; hostile layers refused with nothing written outside the store.

use std::fs;
use std::path::{Path, PathBuf};

use moat_e2e::registry::{
    busybox_rootfs, docker_archive, push, two_platform_index, Auth, Compression, Format,
    ImageBuilder, RawTar, Registry,
};
use moat_e2e::{Options, Server};
use serde_json::json;

/// A busybox rootfs with `/marker` = `text` and an `/app` directory.
fn rootfs(dir: &Path, text: &str) -> PathBuf {
    let root = dir.join(format!("rootfs-{text}"));
    busybox_rootfs(&root);
    fs::create_dir_all(root.join("app")).unwrap();
    fs::write(root.join("marker"), format!("{text}\n")).unwrap();
    root
}

/// Broker config letting the server pull from `registries` over plain HTTP
/// (plus their token servers), with `creds` for the first.
fn registry_toml(registries: &[&Registry], creds: Option<(&str, &Path)>) -> String {
    let mut t = String::new();
    for (i, r) in registries.iter().enumerate() {
        t.push_str(&format!(
            "[registries.\"{}\"]\ninsecure_http = true\n",
            r.host()
        ));
        if let (0, Some((user, file))) = (i, creds) {
            t.push_str(&format!(
                "username = \"{user}\"\npassword_file = \"{}\"\n",
                file.display()
            ));
        }
        if let Some(url) = r.token_url() {
            let host = url
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap()
                .to_string();
            t.push_str(&format!("[registries.\"{host}\"]\ninsecure_http = true\n"));
        }
    }
    t
}

fn server_for(toml: String, images_toml: &str) -> Server {
    Server::start_with(Options {
        broker_toml: toml,
        images_toml: images_toml.to_string(),
        private_store: true,
        pulls: true,
        ..Options::default()
    })
}

fn start_err(s: &Server, name: &str, image: &str) -> (i64, String) {
    s.err(
        "sandbox.start",
        json!({"sandbox": name, "namespace": "default", "config": {"image": image}}),
    )
}

#[test]
fn pulled_by_tag_digest_and_index_they_boot_with_their_config() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(Auth::None);
    let layout = work.path().join("layout");
    ImageBuilder::new()
        .dir(rootfs(work.path(), "v1"))
        .env("GREETING", "hello from the image")
        .env("PATH", "/usr/local/bin:/bin:/usr/bin")
        .workdir("/app")
        .build(&layout, "v1");
    push(&layout, "v1", &registry, "test/bb:v1", Format::Oci);
    let docker_digest = push(
        &layout,
        "v1",
        &registry,
        "test/bb-docker:v1",
        Format::Docker,
    );
    two_platform_index(&layout, "multi");
    push(&layout, "multi", &registry, "test/multi:v1", Format::Oci);

    let s = server_for(registry_toml(&[&registry], None), "");
    let host = registry.host();
    s.start_sandbox("by-tag", json!({"image": format!("{host}/test/bb:v1")}));
    let r = s.run(
        "by-tag",
        "sh",
        &["-c", "echo \"$GREETING\"; pwd; cat /marker"],
    );
    assert_eq!(
        Server::stdout_lines(&r),
        vec!["hello from the image", "/app", "v1"],
        "{r}"
    );
    // The sandbox's own envs override the image's.
    s.stop_sandbox("by-tag");
    s.start_sandbox(
        "by-digest",
        json!({"image": format!("{host}/test/bb-docker@{docker_digest}"), "envs": ["GREETING=mine"]}),
    );
    let r = s.run(
        "by-digest",
        "sh",
        &["-c", "echo \"$GREETING\"; cat /marker"],
    );
    assert_eq!(Server::stdout_lines(&r), vec!["mine", "v1"], "{r}");
    s.stop_sandbox("by-digest");
    s.start_sandbox(
        "by-index",
        json!({"image": format!("{host}/test/multi:v1")}),
    );
    let r = s.run("by-index", "cat", &["/platform"]);
    assert_eq!(Server::stdout_lines(&r), vec!["amd64"], "{r}");
    s.stop_sandbox("by-index");

    // The store lists them; rm removes a name and what only it used.
    let (ok, out, err) = s.image_cli(&["ls"]);
    assert!(ok, "{err}");
    for name in [
        format!("{host}/test/bb:v1"),
        format!("{host}/test/bb-docker@{docker_digest}"),
        format!("{host}/test/multi:v1"),
    ] {
        assert!(out.contains(&name), "{name} missing in:\n{out}");
    }
    let (ok, _, err) = s.image_cli(&["rm", &format!("{host}/test/multi:v1")]);
    assert!(ok, "{err}");
    let (_, out, _) = s.image_cli(&["ls"]);
    assert!(!out.contains("test/multi"), "{out}");
    let (ok, _, err) = s.image_cli(&["rm", &format!("{host}/test/multi:v1")]);
    assert!(!ok && err.contains("no image named"), "{err}");
    // Unknown images are the caller's error.
    let (code, message) = start_err(&s, "unknown", &format!("{host}/test/nope:v1"));
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("not found"), "{message}");
    let (code, message) = start_err(&s, "malformed", "Not/A:Reference:");
    assert_eq!(code, -32602, "{message}");
    s.assert_no_leftovers();
}

#[test]
fn token_and_basic_auth_registries() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    ImageBuilder::new()
        .dir(rootfs(work.path(), "auth"))
        .build(&layout, "v1");
    let token = Registry::start(Auth::token("alice", "s3cret"));
    push(&layout, "v1", &token, "private/img:v1", Format::Oci);
    let basic = Registry::start(Auth::basic("bob", "hunter2"));
    push(&layout, "v1", &basic, "team/img:v1", Format::Oci);
    let pass = work.path().join("bob.pass");
    fs::write(&pass, "hunter2\n").unwrap();

    // Anonymous bearer tokens pull from the token registry; the Basic one
    // needs the configured credentials.
    let s = server_for(registry_toml(&[&basic, &token], Some(("bob", &pass))), "");
    let basic_image = format!("{}/team/img:v1", basic.host());
    let (ok, out, err) = s.image_cli(&["pull", &basic_image]);
    assert!(ok, "pull {basic_image}: {err}");
    assert!(out.contains(&basic_image), "{out}");
    // The token registry's image is pulled by sandbox.start itself.
    s.start_sandbox(
        "from-token-registry",
        json!({"image": format!("{}/private/img:v1", token.host())}),
    );
    let r = s.run("from-token-registry", "cat", &["/marker"]);
    assert_eq!(Server::stdout_lines(&r), vec!["auth"], "{r}");
    s.stop_sandbox("from-token-registry");
    assert!(
        token.token_grants().iter().any(|g| g.user.is_none()),
        "no anonymous token was issued"
    );
    s.assert_no_leftovers();
    drop(s);

    let s = server_for(registry_toml(&[&basic], None), "");
    let (ok, _, err) = s.image_cli(&["pull", &format!("{}/team/img:v1", basic.host())]);
    assert!(!ok);
    assert!(err.contains("requires credentials"), "{err}");
}

#[test]
fn layer_semantics_survive_into_the_guest() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(Auth::None);
    let layout = work.path().join("layout");
    let lower = RawTar::new()
        .file("keep", 0o644, b"kept\n")
        .file("gone", 0o644, b"whited out\n")
        .dir("opq", 0o755)
        .file("opq/a", 0o644, b"a\n")
        .file("opq/b", 0o644, b"b\n")
        .dir("old", 0o755)
        .file("old/x", 0o644, b"x\n")
        .file("mode", 0o4755, b"#!/bin/sh\n")
        .finish();
    let upper = RawTar::new()
        .whiteout("gone")
        .whiteout("old")
        .opaque("opq")
        .file("opq/c", 0o644, b"c\n")
        .hardlink("keep-link", "keep")
        .symlink("sym", "keep")
        .finish();
    ImageBuilder::new()
        .dir(rootfs(work.path(), "layers"))
        .raw_layer(lower, Compression::Gzip)
        .raw_layer(upper, Compression::None)
        .build(&layout, "v1");
    push(&layout, "v1", &registry, "test/layers:v1", Format::Oci);
    let s = server_for(registry_toml(&[&registry], None), "");
    s.start_sandbox(
        "layers",
        json!({"image": format!("{}/test/layers:v1", registry.host())}),
    );
    let r = s.run(
        "layers",
        "sh",
        &[
            "-c",
            "ls /opq | tr '\\n' ' '; echo; \
             [ -e /gone ] && echo gone-present || echo gone-absent; \
             [ -e /old ] && echo old-present || echo old-absent; \
             [ $(stat -c %i /keep) = $(stat -c %i /keep-link) ] && echo hardlinked; \
             readlink /sym; cat /sym; stat -c %a /mode",
        ],
    );
    assert_eq!(
        Server::stdout_lines(&r),
        vec![
            "c ",
            "gone-absent",
            "old-absent",
            "hardlinked",
            "keep",
            "kept",
            "4755"
        ],
        "{r}"
    );
    s.stop_sandbox("layers");
    s.assert_no_leftovers();
}

#[test]
fn hostile_layers_are_refused_and_nothing_lands_outside_the_store() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(Auth::None);
    let layout = work.path().join("layout");
    let base = rootfs(work.path(), "hostile");
    let tag = std::process::id();
    let outside = |what: &str| PathBuf::from(format!("/tmp/moat-escape-{what}-{tag}"));
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "dotdot",
            vec![RawTar::new()
                .file(
                    &format!("../../../../../../tmp/moat-escape-dotdot-{tag}"),
                    0o644,
                    b"x",
                )
                .finish()],
            "..",
        ),
        (
            "absolute",
            vec![RawTar::new()
                .file(&format!("/tmp/moat-escape-absolute-{tag}"), 0o644, b"x")
                .finish()],
            "absolute",
        ),
        (
            "through-symlink",
            vec![
                RawTar::new().symlink("evil", "/tmp").finish(),
                RawTar::new()
                    .file(
                        &format!("evil/moat-escape-through-symlink-{tag}"),
                        0o644,
                        b"x",
                    )
                    .finish(),
            ],
            "symlink",
        ),
        (
            "device",
            vec![RawTar::new().char_device("dev/evil-mem", 1, 1).finish()],
            "device",
        ),
        (
            "bomb",
            vec![RawTar::new()
                .file("zeros", 0o644, &vec![0u8; 96 << 20])
                .finish()],
            "limit",
        ),
    ];
    for (name, layers, _) in &cases {
        let mut b = ImageBuilder::new().dir(&base);
        for l in layers {
            b = b.raw_layer(l.clone(), Compression::Gzip);
        }
        b.build(&layout, name);
        push(
            &layout,
            name,
            &registry,
            &format!("hostile/{name}:v1"),
            Format::Oci,
        );
    }
    let s = server_for(
        registry_toml(&[&registry], None),
        "max_image_bytes = 67108864",
    );
    for (name, _, why) in &cases {
        let image = format!("{}/hostile/{name}:v1", registry.host());
        let (ok, _, err) = s.image_cli(&["pull", &image]);
        assert!(!ok, "{name} was accepted");
        assert!(err.contains(why), "{name}: {err}");
        assert!(
            err.contains(&image),
            "{name}: the message names the image: {err}"
        );
        assert!(!outside(name).exists(), "{name} wrote outside the store");
    }
    // Through the API: the operation failed, saying why.
    let (code, message) = start_err(
        &s,
        "hostile",
        &format!("{}/hostile/dotdot:v1", registry.host()),
    );
    assert_eq!(code, -32603, "{message}");
    assert!(message.contains(".."), "{message}");
    // Nothing half-made stays: no names, no staging trees; gc clears blobs.
    let (_, out, _) = s.image_cli(&["ls"]);
    assert!(!out.contains("hostile/"), "{out}");
    let (ok, out, err) = s.image_cli(&["gc"]);
    assert!(ok, "{err}");
    assert!(out.contains("removed"), "{out}");
    let leftovers: Vec<_> = fs::read_dir(s.dir.path().join("images/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(s.vm_pids().is_empty());
}

#[test]
fn imported_layouts_and_docker_archives_boot() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    ImageBuilder::new()
        .dir(rootfs(work.path(), "imported"))
        .env("FROM", "layout")
        .user("nobody")
        .build(&layout, "v1");
    let archive = work.path().join("saved.tar");
    docker_archive(&layout, "v1", "example.com/saved/img:2", &archive);
    let s = server_for(String::new(), "pull_on_start = false");
    let (ok, out, err) = s.image_cli(&[
        "import",
        layout.to_str().unwrap(),
        "--tag",
        "local/layout:1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("docker.io/local/layout:1"), "{out}");
    // A name is not silently repointed at another image.
    let other = work.path().join("other");
    ImageBuilder::new()
        .dir(rootfs(work.path(), "other"))
        .build(&other, "v1");
    let args = ["import", other.to_str().unwrap(), "--tag", "local/layout:1"];
    let (ok, _, err) = s.image_cli(&args);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = s.image_cli(&[&args[..], &["--force"]].concat());
    assert!(ok, "{err}");
    let (ok, out, err) = s.image_cli(&["import", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("example.com/saved/img:2"), "{out}");
    s.start_sandbox("saved", json!({"image": "example.com/saved/img:2"}));
    // The image's User applies: commands run as nobody, with its home.
    let r = s.run(
        "saved",
        "sh",
        &["-c", "cat /marker; echo $FROM; id -u; echo $HOME"],
    );
    assert_eq!(
        Server::stdout_lines(&r),
        vec!["imported", "layout", "65534", "/nonexistent"],
        "{r}"
    );
    s.stop_sandbox("saved");
    // Not in the store and pulls are off: the caller is told.
    let (code, message) = start_err(&s, "absent", "example.com/absent/img:1");
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("does not pull"), "{message}");
    s.assert_no_leftovers();
}

/// Registry access-log lines for GETs of `digest`'s blob.
fn blob_gets(registry: &Registry, digest: &str) -> Vec<String> {
    registry
        .log_text()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn concurrent_pulls_fetch_once_and_an_interrupted_pull_resumes() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(Auth::None);
    let layout = work.path().join("layout");
    // A layer big enough to split: 8 MiB of incompressible bytes.
    let mut noise = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let built = ImageBuilder::new()
        .dir(rootfs(work.path(), "pulls"))
        .raw_layer(
            RawTar::new().file("noise", 0o644, &noise).finish(),
            Compression::None,
        )
        .build(&layout, "v1");
    moat_e2e::registry::upload(&layout, "v1", &registry, "test/pulls:v1");
    let big = built.layers.last().unwrap().clone();
    let s = server_for(registry_toml(&[&registry], None), "");
    let image = format!("{}/test/pulls:v1", registry.host());

    // An interrupted download left the first half: the pull asks for the
    // rest only (206) and the result is whole.
    let hex = big.digest.trim_start_matches("sha256:");
    let blob = moat_e2e::registry::Layout::open(&layout).read_blob(&big.digest);
    let store = s.dir.path().join("images");
    fs::create_dir_all(store.join("tmp")).unwrap();
    fs::write(
        store.join(format!("tmp/{hex}.partial")),
        &blob[..blob.len() / 2],
    )
    .unwrap();
    let (ok, _, err) = s.image_cli(&["pull", &image]);
    assert!(ok, "{err}");
    let gets = blob_gets(&registry, &big.digest);
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(
        gets[0].contains("\" 206 "),
        "not a ranged request: {gets:?}"
    );
    assert_eq!(
        fs::read(store.join(format!("blobs/sha256/{hex}"))).unwrap(),
        blob
    );

    // Two pulls of another image at once (two processes): each blob is
    // fetched once.
    let built2 = ImageBuilder::new()
        .dir(rootfs(work.path(), "pulls2"))
        .raw_layer(
            RawTar::new()
                .file("noise2", 0o644, &noise[..4 << 20])
                .finish(),
            Compression::Gzip,
        )
        .build(&layout, "v2");
    push(&layout, "v2", &registry, "test/pulls:v2", Format::Oci);
    let image2 = format!("{}/test/pulls:v2", registry.host());
    std::thread::scope(|scope| {
        let a = scope.spawn(|| s.image_cli(&["pull", &image2]));
        let b = scope.spawn(|| s.image_cli(&["pull", &image2]));
        for r in [a.join().unwrap(), b.join().unwrap()] {
            assert!(r.0, "{}", r.2);
        }
    });
    let pushed = moat_e2e::registry::inspect(&registry, None, "test/pulls:v2", &["--raw"]).unwrap();
    for layer in pushed["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        let gets = blob_gets(&registry, d);
        assert_eq!(gets.len(), 1, "{d} fetched {} times: {gets:?}", gets.len());
    }
    let _ = built2;
    // And the result boots.
    s.start_sandbox("pulled", json!({"image": image2}));
    let r = s.run("pulled", "sh", &["-c", "wc -c < /noise2"]);
    assert_eq!(Server::stdout_lines(&r), vec![(4 << 20).to_string()], "{r}");
    s.stop_sandbox("pulled");
    s.assert_no_leftovers();
}

#[test]
fn default_images_run_python_and_node() {
    // The shared store set-up filled: no registry involved.
    let s = Server::start();
    for (name, image, cmd, args) in [
        ("py", "microsandbox/python", "python3", ["-c", "print(1+1)"]),
        (
            "js",
            "microsandbox/node",
            "node",
            ["-e", "console.log(1+1)"],
        ),
    ] {
        s.start_sandbox(name, json!({"image": image}));
        let r = s.run(name, cmd, &args);
        assert_eq!(Server::stdout_lines(&r), vec!["2"], "{image}: {r}");
        s.stop_sandbox(name);
    }
    s.assert_no_leftovers();
}
