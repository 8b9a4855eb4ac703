//! Agent secrets, sealed at rest: XChaCha20-Poly1305 under the node's key (a file in the data
//! directory, mode 0600), with the agent and secret name as associated data, so that a sealed
//! value copied to another row does not open. Values never enter a sandbox: Hangar itself uses
//! them (the Activity Protocol's client secret) on the agent's behalf.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use hangar_proto::agent::{valid_secret_name, SecretInfo};

use crate::{now_rfc3339, Agents, AgentsError};

/// The largest secret value accepted.
pub const MAX_SECRET: usize = 64 * 1024;

/// The node's key for sealing secrets.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Reads the key at `path`, creating it (32 random bytes, mode 0600) if there is none.
    /// The file is created exclusively, so two servers starting at once agree on one key; a
    /// key that others may read is refused rather than used.
    pub fn load_or_create(path: &Path) -> std::io::Result<SecretKey> {
        use std::os::unix::fs::PermissionsExt;
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(&key)?;
                f.sync_all()?;
                return Ok(SecretKey(key));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let mode = f.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} may be read by others (mode {:o}): chmod 600 it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut bytes)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a 32-byte key", path.display()),
            )
        })?;
        Ok(SecretKey(key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    pub(crate) fn seal(&self, agent: &str, name: &str, value: &[u8]) -> String {
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).expect("the OS random source works");
        let aad = format!("{agent}\0{name}");
        let ct = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: aad.as_bytes(),
                },
            )
            .expect("encryption of a bounded value cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    pub(crate) fn open(&self, agent: &str, name: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()?;
        if raw.len() < 24 {
            return None;
        }
        let (nonce, ct) = raw.split_at(24);
        let aad = format!("{agent}\0{name}");
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .ok()
    }
}

/// The egress proxy's source of secret values: `{agent}/{name}` references, opened from the
/// store at each use (so a secret set or removed takes effect on the next request).
pub struct SecretVault {
    store: hangar_store::Store,
    key: SecretKey,
}

impl SecretVault {
    pub fn new(store: hangar_store::Store, key: SecretKey) -> SecretVault {
        SecretVault { store, key }
    }

    /// The reference the proxy is given for an agent's secret.
    pub fn reference(agent: &str, name: &str) -> String {
        format!("{agent}/{name}")
    }
}

impl hangar_sandbox::egress::SecretSource for SecretVault {
    fn secret(
        &self,
        reference: &str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(String, Vec<String>), String>> + Send>,
    > {
        let (store, key) = (self.store.clone(), self.key.clone());
        let reference = reference.to_owned();
        Box::pin(async move {
            let (agent, name) = reference
                .split_once('/')
                .ok_or_else(|| format!("bad secret reference {reference:?}"))?;
            let (sealed, hosts) = store
                .secret_and_hosts(agent, name)
                .await
                .map_err(|e| format!("reading secret {name:?}: {e}"))?
                .ok_or_else(|| {
                    format!("agent {agent:?} has no secret {name:?} (hangar secrets set {agent} {name})")
                })?;
            let value = key
                .open(agent, name, &sealed)
                .ok_or_else(|| format!("secret {name:?} does not open with this server's key"))?;
            let value =
                String::from_utf8(value).map_err(|_| format!("secret {name:?} is not text"))?;
            Ok((value, serde_json::from_str(&hosts).unwrap_or_default()))
        })
    }
}

impl Agents {
    fn secret_key(&self) -> Result<&SecretKey, AgentsError> {
        self.inner.cfg.secrets_key.as_ref().ok_or_else(|| {
            AgentsError::Invalid(
                "this server has no key for secrets (hangar serve makes one)".into(),
            )
        })
    }

    /// Sets a secret. `hosts` are where the egress proxy may send it (`network.inject` can
    /// name only those): the admin who sets a secret decides where it may go, not whoever
    /// deploys the agent.
    pub async fn set_secret(
        &self,
        agent: &str,
        name: &str,
        value: &[u8],
        hosts: &[String],
    ) -> Result<SecretInfo, AgentsError> {
        valid_secret_name(name).map_err(AgentsError::Invalid)?;
        for h in hosts {
            hangar_sandbox::egress::valid_host_pattern(h)
                .map_err(|e| AgentsError::Invalid(format!("host: {e}")))?;
        }
        if value.is_empty() || value.len() > MAX_SECRET {
            return Err(AgentsError::Invalid(format!(
                "a secret's value must be 1 to {MAX_SECRET} bytes, not {}",
                value.len()
            )));
        }
        self.require_agent(agent).await?;
        let sealed = self.secret_key()?.seal(agent, name, value);
        let now = now_rfc3339();
        self.inner
            .store
            .put_secret(
                agent,
                name,
                &sealed,
                &serde_json::to_string(hosts).expect("strings serialise"),
                &now,
            )
            .await?;
        Ok(SecretInfo {
            name: name.to_owned(),
            updated_at: now,
            hosts: hosts.to_vec(),
        })
    }

    pub async fn secrets(&self, agent: &str) -> Result<Vec<SecretInfo>, AgentsError> {
        self.require_agent(agent).await?;
        Ok(self
            .inner
            .store
            .secrets(agent)
            .await?
            .into_iter()
            .map(|(name, updated_at, hosts)| SecretInfo {
                name,
                updated_at,
                hosts: serde_json::from_str(&hosts).unwrap_or_default(),
            })
            .collect())
    }

    pub async fn delete_secret(&self, agent: &str, name: &str) -> Result<(), AgentsError> {
        self.require_agent(agent).await?;
        if self.inner.store.delete_secret(agent, name).await? {
            Ok(())
        } else {
            Err(AgentsError::NotFound(format!(
                "agent {agent:?} has no secret {name:?}"
            )))
        }
    }

    /// A secret's value, for Hangar's own use on the agent's behalf.
    pub async fn secret_value(&self, agent: &str, name: &str) -> Result<Vec<u8>, AgentsError> {
        let sealed = self.inner.store.secret(agent, name).await?.ok_or_else(|| {
            AgentsError::NotFound(format!(
                "agent {agent:?} has no secret {name:?} (hangar secrets set {agent} {name})"
            ))
        })?;
        self.secret_key()?
            .open(agent, name, &sealed)
            .ok_or_else(|| {
                AgentsError::Agent(format!(
                    "secret {name:?} of agent {agent:?} does not open with this server's key"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_as_the_same_agent_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let key = SecretKey::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = SecretKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKey::load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let sealed = key.seal("notes", "bot", b"hunter2");
        assert!(!sealed.contains("hunter2"));
        assert_eq!(again.open("notes", "bot", &sealed).unwrap(), b"hunter2");
        assert!(key.open("notes", "other", &sealed).is_none());
        assert!(key.open("other", "bot", &sealed).is_none());
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&sealed)
            .unwrap();
        raw[30] ^= 1;
        let tampered = base64::engine::general_purpose::STANDARD.encode(raw);
        assert!(key.open("notes", "bot", &tampered).is_none());
    }
}
