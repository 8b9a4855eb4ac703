//! Where `hangar-init` finds its run directory and configuration.
//!
//! The configuration holds the control secret, so it is deleted from disk as soon as it is read.
//! This module must never log the secret.

use std::path::{Path, PathBuf};

use hangar_proto::init::{InitConfig, INIT_CONFIG_FILE, RUN_DIR_IN_SANDBOX};

/// Paths that differ between production and tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The run directory shared with the host (`/run/hangar`; `HANGAR_RUN_DIR` overrides it for
    /// tests that run `hangar-init` as an ordinary process).
    pub run_dir: PathBuf,
    /// The directory the files API treats as `/`. Always `/` in a sandbox; `HANGAR_FILES_ROOT`
    /// overrides it only so that tests outside a sandbox do not touch the host's files.
    pub files_root: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        let var = |name: &str, default: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Paths {
            run_dir: var("HANGAR_RUN_DIR", RUN_DIR_IN_SANDBOX),
            files_root: var("HANGAR_FILES_ROOT", "/"),
        }
    }
}

#[derive(Debug)]
pub enum ConfigError {
    Read(PathBuf, std::io::Error),
    Parse(PathBuf, serde_json::Error),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            ConfigError::Parse(p, e) => write!(f, "invalid {}: {e}", p.display()),
        }
    }
}

/// Reads `init.json` from the run directory and removes it (even when it does not parse, since
/// it may still hold the secret).
pub fn load(run_dir: &Path) -> Result<InitConfig, ConfigError> {
    let path = run_dir.join(INIT_CONFIG_FILE);
    let text = std::fs::read(&path).map_err(|e| ConfigError::Read(path.clone(), e))?;
    if let Err(e) = std::fs::remove_file(&path) {
        log!("cannot remove {}: {e}", path.display());
    }
    serde_json::from_slice(&text).map_err(|e| ConfigError::Parse(path, e))
}
