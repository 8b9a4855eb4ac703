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

/// Seconds since the epoch as an RFC 3339 UTC timestamp (`2026-11-27T03:14:22Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_749_262), "2026-11-27T03:14:22Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
