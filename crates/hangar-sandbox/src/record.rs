//! A sandbox's persisted record: everything needed to act on it again after `hangar serve`
//! restarts. Written atomically (temp file, then rename) before each transition is acted on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hangar_image::{Image, ImageConfig};
use hangar_proto::sandbox::Sandbox;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub sandbox: Sandbox,
    /// The bearer secret of this sandbox's `control.sock`.
    pub secret: String,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub image_id: String,
    pub layers: Vec<PathBuf>,
    pub image_config: ImageConfig,
    /// Secrets the egress proxy adds to requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<hangar_proto::sandbox::SecretInjection>,
    /// Detectors for egress request bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlp: Option<hangar_proto::sandbox::EgressDlp>,
    /// The current session token: kept in memory only (it is short-lived and Hangar sends a
    /// fresh one after a restart).
    #[serde(skip)]
    pub token: Option<String>,
}

impl Record {
    pub fn image(&self) -> Image {
        Image {
            id: self.image_id.clone(),
            layers: self.layers.clone(),
            config: self.image_config.clone(),
        }
    }

    pub fn load(path: &Path) -> std::io::Result<Record> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("record serialises"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// Now as an RFC 3339 UTC timestamp with whole seconds (`2026-11-27T03:14:22Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), "2026-11-27T03:14:22Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
