//! From an image's files to what a root filesystem is made of: the manifest for linux/amd64,
//! its config and its layers, in the two formats images come in.
//!
//! - **OCI** (an image layout or an OCI archive; newer `docker save` writes one too, and it
//!   is preferred when present): `index.json` → (nested indexes, Docker manifest lists) → the
//!   manifest whose platform is linux/amd64 (or that names no platform and whose config says
//!   amd64) → config and layers, each a blob checked against its descriptor's digest and size.
//!   Attestation manifests (platform `unknown/unknown`) are skipped. With several amd64
//!   manifests (several tags) the first is used.
//! - **`docker save`** (`manifest.json` listing `Config` and `Layers` as paths): the first
//!   image listed. The config's name carries its digest (`<hex>.json` or
//!   `blobs/sha256/<hex>`), and each layer is checked against the config's `rootfs.diff_ids`
//!   (docker saves layers uncompressed, so the digest of the file is its diff id). The
//!   config's digest (the image id) stands for the manifest digest in the cache key.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::store::{Digest, ReadImageError, Store};

/// How deep indexes may nest.
const MAX_DEPTH: usize = 8;

/// One layer: where it is and what it must hash to.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    /// Its path in the image.
    pub(crate) name: String,
    /// Its digest.
    pub(crate) digest: Digest,
    /// Its size, when the image says.
    pub(crate) size: Option<u64>,
}

/// An image resolved to its parts.
#[derive(Debug)]
pub(crate) struct Image {
    /// The manifest's digest (for `docker save`, the config's): the image's identity.
    pub(crate) id: Digest,
    /// How to run it.
    pub(crate) config: RunConfig,
    /// Its layers, lowest first.
    pub(crate) layers: Vec<Layer>,
}

/// What an image config says about running it (`config` in the OCI image config).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    #[serde(default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) env: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) working_dir: Option<String>,
    #[serde(default)]
    pub(crate) user: Option<String>,
    #[serde(default)]
    pub(crate) exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    fn name(&self) -> String {
        match &self.variant {
            Some(variant) => format!("{}/{}/{variant}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }

    /// linux/amd64 (an image config may leave the os out).
    fn is_target(&self) -> bool {
        matches!(self.os.as_str(), "linux" | "") && self.architecture == "amd64"
    }
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(flatten)]
    platform: Platform,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<ConfigRootfs>,
}

#[derive(Deserialize)]
struct ConfigRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    layers: Vec<String>,
}

fn is_index(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

/// Finds the linux/amd64 image in `store`.
pub(crate) fn resolve(store: &Store, path: &std::path::Path) -> Result<Image, ReadImageError> {
    if store.has("oci-layout") && store.has("index.json") {
        let index: Index = store.read_json("index.json", None, None)?;
        let mut found = Vec::new();
        return match from_index(store, &index, 0, &mut found)? {
            Some(image) => Ok(image),
            None if found.is_empty() => Err(ReadImageError::NoManifest),
            None => Err(ReadImageError::Platform {
                found: found.join(", "),
            }),
        };
    }
    if store.has("manifest.json") {
        return from_docker(store);
    }
    Err(ReadImageError::NotAnImage {
        path: path.to_owned(),
    })
}

/// The first linux/amd64 image under `index`, noting in `found` the other platforms seen.
fn from_index(
    store: &Store,
    index: &Index,
    depth: usize,
    found: &mut Vec<String>,
) -> Result<Option<Image>, ReadImageError> {
    if depth > MAX_DEPTH {
        return Err(ReadImageError::TooDeep);
    }
    for descriptor in &index.manifests {
        if let Some(platform) = &descriptor.platform {
            if platform.os == "unknown" {
                continue; // an attestation, not an image
            }
            if !platform.is_target() {
                found.push(platform.name());
                continue;
            }
        }
        let digest = Digest::parse(&descriptor.digest)?;
        if is_index(&descriptor.media_type) {
            let nested: Index =
                store.read_json(&digest.blob_path(), Some(&digest), descriptor.size)?;
            if let Some(image) = from_index(store, &nested, depth + 1, found)? {
                return Ok(Some(image));
            }
            continue;
        }
        let manifest: Manifest =
            store.read_json(&digest.blob_path(), Some(&digest), descriptor.size)?;
        let config_digest = Digest::parse(&manifest.config.digest)?;
        let config: Config = store.read_json(
            &config_digest.blob_path(),
            Some(&config_digest),
            manifest.config.size,
        )?;
        if !config.platform.architecture.is_empty() && !config.platform.is_target() {
            found.push(config.platform.name());
            continue;
        }
        let layers = manifest
            .layers
            .iter()
            .map(|layer| {
                let digest = Digest::parse(&layer.digest)?;
                Ok(Layer {
                    name: digest.blob_path(),
                    digest,
                    size: layer.size,
                })
            })
            .collect::<Result<_, ReadImageError>>()?;
        return Ok(Some(Image {
            id: digest,
            config: config.config.unwrap_or_default(),
            layers,
        }));
    }
    Ok(None)
}

/// The first image of a `docker save` archive.
fn from_docker(store: &Store) -> Result<Image, ReadImageError> {
    let entries: Vec<DockerEntry> = store.read_json("manifest.json", None, None)?;
    let entry = entries.first().ok_or(ReadImageError::NoManifest)?;
    let config_hex = entry
        .config
        .strip_prefix("blobs/sha256/")
        .or_else(|| entry.config.strip_suffix(".json"))
        .ok_or_else(|| ReadImageError::BadPath {
            name: entry.config.clone(),
        })?;
    let config_digest = Digest::parse(&format!("sha256:{config_hex}"))?;
    let config: Config = store.read_json(&entry.config, Some(&config_digest), None)?;
    if !config.platform.architecture.is_empty() && !config.platform.is_target() {
        return Err(ReadImageError::Platform {
            found: config.platform.name(),
        });
    }
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(ReadImageError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: entry.layers.len(),
        });
    }
    let layers = entry
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(name, diff_id)| {
            Ok(Layer {
                name: name.clone(),
                digest: Digest::parse(diff_id)?,
                size: None,
            })
        })
        .collect::<Result<_, ReadImageError>>()?;
    Ok(Image {
        id: config_digest,
        config: config.config.unwrap_or_default(),
        layers,
    })
}
