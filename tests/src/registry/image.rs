//! Single-platform images in an OCI layout, without Docker: the image is
//! started with `umoci new`; each rootfs directory becomes a layer made by
//! `umoci unpack`/`repack` in a scratch layout, each raw tarball (hostile
//! layers) a blob as given; both are added by hand (blob, diff_id, history,
//! new config and manifest, `index.json`); then `umoci config` sets Env,
//! WorkingDir, Entrypoint, Cmd, User and os/architecture. Also the busybox
//! rootfs that makes a bootable test image.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use serde_json::{json, Value};

use super::layout::{
    sha256_digest, Descriptor, Layout, CONFIG, LAYER_TAR, LAYER_TAR_GZIP, MANIFEST,
};
use super::run;

/// How a raw layer's blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`, the bytes as given.
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
}

/// An image's `os` and `architecture` (`linux`/`amd64` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

#[derive(Debug, Clone)]
enum Layer {
    Dir(PathBuf),
    Raw {
        tar: Vec<u8>,
        compression: Compression,
    },
}

/// Describes an image; [`ImageBuilder::build`] writes it into a layout.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    layers: Vec<Layer>,
    env: Vec<String>,
    workdir: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: Option<String>,
    platform: Platform,
}

/// What [`ImageBuilder::build`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub layout: PathBuf,
    pub tag: String,
    pub platform: Platform,
    /// The image manifest (`index.json` points `tag` at it).
    pub manifest: Descriptor,
    pub config: Descriptor,
    /// Layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// No layers, empty config, linux/amd64.
    pub fn new() -> ImageBuilder {
        ImageBuilder {
            layers: Vec::new(),
            env: Vec::new(),
            workdir: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            user: None,
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
            },
        }
    }

    /// One layer holding the tree under `rootfs` (it must exist at build time).
    pub fn dir(mut self, rootfs: impl Into<PathBuf>) -> ImageBuilder {
        self.layers.push(Layer::Dir(rootfs.into()));
        self
    }

    /// One layer whose uncompressed tarball is `tar`, stored as given (see
    /// [`super::RawTar`]); its diff_id is the sha256 of `tar`.
    pub fn raw_layer(mut self, tar: Vec<u8>, compression: Compression) -> ImageBuilder {
        self.layers.push(Layer::Raw { tar, compression });
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> ImageBuilder {
        self.env.push(format!("{key}={value}"));
        self
    }

    pub fn workdir(mut self, dir: &str) -> ImageBuilder {
        self.workdir = Some(dir.into());
        self
    }

    pub fn entrypoint(mut self, argv: &[&str]) -> ImageBuilder {
        self.entrypoint = argv.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn cmd(mut self, argv: &[&str]) -> ImageBuilder {
        self.cmd = argv.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn user(mut self, user: &str) -> ImageBuilder {
        self.user = Some(user.into());
        self
    }

    pub fn platform(mut self, os: &str, architecture: &str) -> ImageBuilder {
        self.platform = Platform {
            os: os.into(),
            architecture: architecture.into(),
        };
        self
    }

    /// Writes the image into the layout at `layout` (created when missing)
    /// under `tag`, replacing an image of that tag.
    pub fn build(&self, layout: &Path, tag: &str) -> BuiltImage {
        if !layout.join("oci-layout").exists() {
            umoci(&["init", "--layout"], layout);
        }
        let image = format!("{}:{tag}", layout.display());
        umoci(&["new", "--image"], &image);
        let target = Layout::open(layout);
        for layer in &self.layers {
            match layer {
                Layer::Dir(dir) => {
                    let (media_type, blob, diff_id) = umoci_layer(dir);
                    let history = format!("umoci repack of {}", dir.display());
                    append_layer(&target, tag, &media_type, &blob, &diff_id, &history);
                }
                Layer::Raw { tar, compression } => {
                    let (media_type, blob) = match compression {
                        Compression::None => (LAYER_TAR, tar.clone()),
                        Compression::Gzip => (LAYER_TAR_GZIP, gzip(tar)),
                    };
                    let diff_id = sha256_digest(tar);
                    append_layer(
                        &target,
                        tag,
                        media_type,
                        &blob,
                        &diff_id,
                        "moat-e2e raw layer",
                    );
                }
            }
        }
        run(
            Command::new("umoci").args(self.config_args(&image)),
            "umoci config",
        );
        read_image(layout, tag, self.platform.clone())
    }

    fn config_args(&self, image: &str) -> Vec<String> {
        let mut args: Vec<String> = ["config", "--image", image].map(String::from).to_vec();
        let mut flag = |name: &str, value: &str| {
            args.push(format!("--{name}"));
            args.push(value.to_string());
        };
        flag("os", &self.platform.os);
        flag("architecture", &self.platform.architecture);
        self.env.iter().for_each(|e| flag("config.env", e));
        self.entrypoint
            .iter()
            .for_each(|a| flag("config.entrypoint", a));
        self.cmd.iter().for_each(|a| flag("config.cmd", a));
        if let Some(dir) = &self.workdir {
            flag("config.workingdir", dir);
        }
        if let Some(user) = &self.user {
            flag("config.user", user);
        }
        args
    }
}

/// Runs `umoci ARGS LAST`, adding `--rootless` to unpack and repack when not
/// root.
fn umoci(args: &[&str], last: impl AsRef<OsStr>) {
    let mut cmd = Command::new("umoci");
    cmd.args(args);
    if matches!(args[0], "unpack" | "repack") && !nix::unistd::geteuid().is_root() {
        cmd.arg("--rootless");
    }
    run(cmd.arg(last), &format!("umoci {}", args[0]));
}

/// The layer umoci makes of the tree `dir` on its own: `(media type, blob,
/// diff_id)`. An empty image in a scratch layout is unpacked, `dir` copied
/// into its rootfs with `cp -a`, and repacked. (`umoci insert` would be
/// simpler, but umoci 0.4.7's insert never closes its tar writer, so its
/// layers lack the last entry's padding and the end-of-archive blocks:
/// umoci issue #436, fixed in PR #534 after 0.4.7.)
fn umoci_layer(dir: &Path) -> (String, Vec<u8>, String) {
    assert!(
        dir.is_dir(),
        "layer tree {} is not a directory",
        dir.display()
    );
    let scratch = tempfile::tempdir().expect("scratch dir for umoci");
    let layout = scratch.path().join("layout");
    let bundle = scratch.path().join("bundle");
    let image = format!("{}:layer", layout.display());
    umoci(&["init", "--layout"], &layout);
    umoci(&["new", "--image"], &image);
    umoci(&["unpack", "--image", &image], &bundle);
    run(
        Command::new("cp")
            .arg("-a")
            .arg(dir.join("."))
            .arg(bundle.join("rootfs")),
        "cp -a (layer tree into the umoci bundle)",
    );
    umoci(&["repack", "--image", &image], &bundle);
    let layout = Layout::open(&layout);
    let manifest = layout.read_json(&layout.resolve("layer").digest);
    let config = layout.read_json(manifest["config"]["digest"].as_str().expect("config"));
    let layer = Descriptor::from_json(&manifest["layers"][0]);
    let diff_id = config["rootfs"]["diff_ids"][0].as_str().expect("diff_id");
    (
        layer.media_type,
        layout.read_blob(&layer.digest),
        diff_id.into(),
    )
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(tar).expect("gzip layer");
    gz.finish().expect("gzip layer")
}

/// Adds `blob` as the top layer of `tag`: the blob, its diff_id and a
/// history entry in a new config, a new manifest, and `index.json` pointing
/// `tag` at it.
fn append_layer(
    layout: &Layout,
    tag: &str,
    media_type: &str,
    blob: &[u8],
    diff_id: &str,
    created_by: &str,
) {
    let mut manifest = layout.read_json(&layout.resolve(tag).digest);
    let mut config = layout.read_json(manifest["config"]["digest"].as_str().expect("config"));
    let layer = layout.write_blob(media_type, blob);
    push_json(&mut config["rootfs"]["diff_ids"], json!(diff_id));
    push_json(&mut config["history"], json!({ "created_by": created_by }));
    manifest["config"] = layout.write_json(CONFIG, &config).to_json();
    push_json(&mut manifest["layers"], layer.to_json());
    layout.set_ref(tag, &layout.write_json(MANIFEST, &manifest));
}

fn push_json(list: &mut Value, item: Value) {
    if list.is_null() {
        *list = json!([]);
    }
    list.as_array_mut().expect("JSON array").push(item);
}

fn read_image(dir: &Path, tag: &str, platform: Platform) -> BuiltImage {
    let layout = Layout::open(dir);
    let manifest = layout.resolve(tag);
    let body = layout.read_json(&manifest.digest);
    BuiltImage {
        layout: dir.to_path_buf(),
        tag: tag.into(),
        platform,
        config: Descriptor::from_json(&body["config"]),
        layers: body["layers"]
            .as_array()
            .expect("manifest layers")
            .iter()
            .map(Descriptor::from_json)
            .collect(),
        manifest,
    }
}

/// Fills `dir` with a minimal bootable tree: Debian's static `/bin/busybox`
/// with a symlink per applet (`sh`, `cat`, `ls`, `echo`, `env`, `pwd`, ...),
/// `/etc/passwd` and `/etc/group` (root, nobody), and the usual empty
/// directories (`/tmp` and `/var/tmp` mode 1777).
pub fn busybox_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    for sub in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "root",
        "tmp",
        "proc",
        "sys",
        "dev",
        "run",
        "var/tmp",
        "home",
        "workspace",
    ] {
        fs::create_dir_all(dir.join(sub)).expect("create rootfs directory");
    }
    for sticky in ["tmp", "var/tmp"] {
        fs::set_permissions(dir.join(sticky), fs::Permissions::from_mode(0o1777))
            .expect("chmod 1777");
    }
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700)).expect("chmod root");
    fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    let applets = run(
        Command::new(busybox).arg("--list-full"),
        "busybox --list-full",
    );
    for applet in applets
        .lines()
        .filter(|a| !a.is_empty() && *a != "bin/busybox")
    {
        let link = dir.join(applet);
        if link.symlink_metadata().is_err() {
            symlink("/bin/busybox", &link).expect("applet symlink");
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("write /etc/passwd");
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("write /etc/group");
}
