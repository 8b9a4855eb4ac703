//! Resolves a user spec (`""`, `name`, `uid`, `uid:gid`, `name:group`) to numeric ids.
//!
//! `/etc/passwd` and `/etc/group` of the sandbox are parsed by hand: this binary is static, and
//! glibc's `getpwnam` would try to load NSS modules that the image may not have. The parsers are
//! pure functions over the files' text; nothing here changes the process's identity.

use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The home directory from `/etc/passwd`, if the user has an entry.
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::UnknownUser(u) => write!(f, "unknown user {u:?}"),
            UserError::UnknownGroup(g) => write!(f, "unknown group {g:?}"),
        }
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0],
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5],
            })
        })
}

fn group_gid(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 3 && f[0] == name {
                f[2].parse().ok()
            } else {
                None
            }
        })
}

/// Resolves `spec` against the text of `/etc/passwd` and `/etc/group`.
///
/// An empty user is root. A numeric uid without a passwd entry is allowed (as in Docker) and gets
/// gid 0 and no home. An explicit group (`:group`) replaces the passwd entry's primary group.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u.trim(), Some(g.trim())),
        None => (spec.trim(), None),
    };
    let mut id = if user.is_empty() {
        let root = passwd_entries(passwd).find(|e| e.uid == 0);
        Identity {
            uid: 0,
            gid: root.as_ref().map_or(0, |e| e.gid),
            home: root.map(|e| e.home.to_string()),
        }
    } else if let Ok(uid) = user.parse::<u32>() {
        match passwd_entries(passwd).find(|e| e.uid == uid) {
            Some(e) => Identity {
                uid,
                gid: e.gid,
                home: Some(e.home.to_string()),
            },
            None => Identity {
                uid,
                gid: 0,
                home: None,
            },
        }
    } else {
        let e = passwd_entries(passwd)
            .find(|e| e.name == user)
            .ok_or_else(|| UserError::UnknownUser(user.to_string()))?;
        Identity {
            uid: e.uid,
            gid: e.gid,
            home: Some(e.home.to_string()),
        }
    };
    if let Some(g) = group_spec.filter(|g| !g.is_empty()) {
        id.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_gid(group, g).ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        };
    }
    Ok(id)
}

/// Resolves `spec` against `<root>/etc/passwd` and `<root>/etc/group`; a missing file counts as
/// empty (distroless images may have neither).
pub fn resolve_in(root: &Path, spec: &str) -> Result<Identity, UserError> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    resolve(spec, &read("etc/passwd"), &read("etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
app:x:1000:1001:App,,,:/home/app:/bin/sh
nouid:x:abc:1:x:/:/bin/sh
";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1001:\n";

    fn id(uid: u32, gid: u32, home: Option<&str>) -> Result<Identity, UserError> {
        Ok(Identity {
            uid,
            gid,
            home: home.map(str::to_string),
        })
    }

    #[test]
    fn resolves_specs() {
        let check =
            |spec: &str, expect| assert_eq!(resolve(spec, PASSWD, GROUP), expect, "spec {spec:?}");
        check("", id(0, 0, Some("/root")));
        check("root", id(0, 0, Some("/root")));
        check("app", id(1000, 1001, Some("/home/app")));
        check("1000", id(1000, 1001, Some("/home/app")));
        check("4242", id(4242, 0, None));
        check("4242:7", id(4242, 7, None));
        check("app:staff", id(1000, 50, Some("/home/app")));
        check("app:0", id(1000, 0, Some("/home/app")));
        check(":staff", id(0, 50, Some("/root")));
        check("nobody", Err(UserError::UnknownUser("nobody".into())));
        check("nouid", Err(UserError::UnknownUser("nouid".into())));
        check("app:wheel", Err(UserError::UnknownGroup("wheel".into())));
    }

    #[test]
    fn empty_files_still_allow_root_and_numeric_ids() {
        assert_eq!(resolve("", "", ""), id(0, 0, None));
        assert_eq!(resolve("65534:65534", "", ""), id(65534, 65534, None));
        assert_eq!(
            resolve("app", "", "").unwrap_err().to_string(),
            "unknown user \"app\""
        );
    }
}
