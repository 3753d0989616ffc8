//! `moat image pull|import|ls|rm|gc`: the operator's view of the image
//! store named by the broker config (`[images] store`). The CLI works on
//! the store directly (as root), next to a running broker: store locks keep
//! them apart (gc waits for pulls and starts; concurrent pulls of one blob
//! or disk do the work once).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Subcommand;
use moat_broker::config::BrokerConfig;
use moat_broker::images::{Images, Progress, ProgressFn, Reference, Store};

const DEFAULT_CONFIG: &str = "/etc/moat/broker.toml";

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image (`python:3.12-slim`, `ghcr.io/org/img@sha256:…`) into the store.
    Pull {
        reference: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        broker_config: PathBuf,
    },
    /// Import an OCI image layout directory or a `docker save` tarball.
    Import {
        path: PathBuf,
        /// Name to store it under (default: the name the archive carries).
        #[arg(long)]
        tag: Option<String>,
        /// Replace a name that already points at another image.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        broker_config: PathBuf,
    },
    /// List stored images.
    Ls {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        broker_config: PathBuf,
    },
    /// Remove an image name and whatever only it used.
    Rm {
        name: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        broker_config: PathBuf,
    },
    /// Remove blobs, disks and temporaries no image name needs.
    Gc {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        broker_config: PathBuf,
    },
}

fn images(config: &std::path::Path) -> Result<Images> {
    let cfg = BrokerConfig::load(config)?;
    cfg.validate()?;
    let store = Store::open(&cfg.images.store)?;
    Ok(Images::new(
        store,
        cfg.registries.clone(),
        cfg.images.limits(),
    )?)
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Pull {
            reference,
            broker_config,
        } => {
            let images = images(&broker_config)?;
            let r = Reference::parse(&reference)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            let bar = Bar::new(&r.to_string());
            let record = rt.block_on(images.pull(&r, bar.callback()))?;
            bar.finish();
            println!("{} {}", record.name, record.manifest);
        }
        ImageCommand::Import {
            path,
            tag,
            force,
            broker_config,
        } => {
            let images = images(&broker_config)?;
            let bar = Bar::new(&path.display().to_string());
            let record = images.import_path(&path, tag.as_deref(), force, bar.callback())?;
            bar.finish();
            println!("{} {}", record.name, record.manifest);
        }
        ImageCommand::Ls { broker_config } => {
            let images = images(&broker_config)?;
            println!("{:<60} {:<19} {:>10}", "NAME", "MANIFEST", "SIZE");
            for r in images.list()? {
                println!(
                    "{:<60} {:<19} {:>10}",
                    r.name,
                    r.manifest.get(..19).unwrap_or(&r.manifest),
                    mib(r.size)
                );
            }
        }
        ImageCommand::Rm {
            name,
            broker_config,
        } => {
            let images = images(&broker_config)?;
            if !images.remove(&name)? {
                anyhow::bail!("no image named {name} in the store (see `moat image ls`)");
            }
            println!("removed {name}");
        }
        ImageCommand::Gc { broker_config } => {
            let images = images(&broker_config)?;
            let r = images.store().gc()?;
            println!(
                "removed {} blobs, {} disks, {} temporaries ({})",
                r.blobs,
                r.disks,
                r.temporaries,
                mib(r.bytes)
            );
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// A one-line progress bar on a terminal; plain lines otherwise.
struct Bar {
    state: Arc<Mutex<BarState>>,
}

struct BarState {
    what: String,
    tty: bool,
    total: u64,
    layers: usize,
    done: usize,
    have: BTreeMap<String, u64>,
}

impl Bar {
    fn new(what: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(BarState {
                what: what.to_owned(),
                tty: std::io::stderr().is_terminal(),
                total: 0,
                layers: 0,
                done: 0,
                have: BTreeMap::new(),
            })),
        }
    }

    fn callback(&self) -> ProgressFn {
        let state = self.state.clone();
        Arc::new(move |p| {
            let Ok(mut s) = state.lock() else { return };
            let mut err = std::io::stderr().lock();
            match p {
                Progress::Resolved {
                    manifest,
                    layers,
                    bytes,
                } => {
                    s.total = bytes;
                    s.layers = layers;
                    let _ = writeln!(
                        err,
                        "{}: manifest {manifest}, {layers} layers, {}",
                        s.what,
                        mib(bytes)
                    );
                }
                Progress::LayerBytes { layer, have, .. } => {
                    s.have.insert(layer.to_string(), have);
                    if s.tty {
                        let sum: u64 = s.have.values().sum();
                        let pct = (sum * 100).checked_div(s.total).unwrap_or(100);
                        let width = 30usize;
                        let filled = (pct as usize * width / 100).min(width);
                        let _ = write!(
                            err,
                            "\r[{}{}] {pct:>3}% {} / {}  layers {}/{}   ",
                            "#".repeat(filled),
                            "-".repeat(width - filled),
                            mib(sum),
                            mib(s.total),
                            s.done,
                            s.layers
                        );
                    }
                }
                Progress::LayerDone { layer, cached } => {
                    s.done += 1;
                    if !s.tty {
                        let _ = writeln!(
                            err,
                            "layer {} {} ({}/{})",
                            layer.short(),
                            if cached {
                                "already present"
                            } else {
                                "downloaded"
                            },
                            s.done,
                            s.layers
                        );
                    }
                }
                Progress::BuildingDisk => {
                    let _ = writeln!(
                        err,
                        "{}building the boot disk",
                        if s.tty { "\n" } else { "" }
                    );
                }
                Progress::Done { stats: Some(st) } => {
                    let secs = (st.unpack_ms + st.mkfs_ms).max(1) as f64 / 1000.0;
                    let _ = writeln!(
                        err,
                        "boot disk: {} entries, {} unpacked in {} ms, mkfs {} ms ({:.1} MB/s)",
                        st.entries,
                        mib(st.bytes),
                        st.unpack_ms,
                        st.mkfs_ms,
                        st.bytes as f64 / 1e6 / secs
                    );
                }
                Progress::Done { stats: None } => {}
            }
        })
    }

    fn finish(&self) {
        if let Ok(s) = self.state.lock() {
            if s.tty {
                eprintln!();
            }
        }
    }
}
