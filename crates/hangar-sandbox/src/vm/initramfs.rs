//! The `vm` driver's boot assets: the guest kernel `scripts/install-host-deps.sh` unpacks, the
//! modules the guest needs from its tree, and the initramfs that carries `hangar-init` and those
//! modules into the guest.
//!
//! The host has no kmod (no `depmod`, no `modinfo`) and the kernel's `.deb` ships no
//! `modules.dep`, so module dependencies are read here from each module's `.modinfo` strings.
//! The initramfs is built once per (init binary, kernel, modules) and cached under a hash of
//! them; per VM start the driver appends a small [`config_archive`] to a copy of it, so nothing
//! secret goes on the kernel command line. This module never installs anything on the host and
//! never runs a program: it only reads the kernel tree and writes files in the cache directory.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Where `scripts/install-host-deps.sh` puts kernels; `current` points at the one to use.
const SYSTEM_KERNELS: &str = "/var/lib/hangar/vm/kernels";

/// The modules the guest loads, in the order a reader expects them: the virtio transport and
/// the block and console devices, overlayfs for the root, erofs for read-only image disks.
/// Dependencies not named here are added by [`resolve_modules`].
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    // Free page reporting: the guest hands back memory it frees, so that its RAM file (the
    // memory snapshot) holds only what is in use.
    "virtio_balloon",
    "overlay",
    "libcrc32c",
    "erofs",
];

/// Where the modules live inside the initramfs, and the file listing them in load order.
const MODULES_DIR: &str = "lib/modules/hangar";
const ORDER_FILE: &str = "lib/modules/hangar/order";
/// The initramfs's directories: mount points for `hangar-init`, and the modules' directory.
const BASE_DIRS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "run",
    "mnt",
    "lib",
    "lib/modules",
    MODULES_DIR,
];

/// Bumped whenever the archive's layout changes, so cached initramfs files of an older layout
/// are never reused.
const LAYOUT_VERSION: &[u8] = b"hangar-initramfs-1";

#[derive(Debug, thiserror::Error)]
pub enum VmAssetError {
    #[error(
        "the configured guest kernel {path} is not a file: fix the kernel path, or remove it to \
         use the kernel scripts/install-host-deps.sh installs"
    )]
    ExplicitKernel { path: PathBuf },
    #[error(
        "no guest kernel at {data_dir} or {system}: run scripts/install-host-deps.sh as root, \
         or set a kernel path in the config"
    )]
    NoKernel { data_dir: PathBuf, system: PathBuf },
    #[error("resolving the guest kernel {path}")]
    ResolveKernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the kernel modules under {path}")]
    ReadModulesTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the guest needs kernel module {name}, which is neither under {dir} nor in its \
         modules.builtin: use a kernel that has it (scripts/install-host-deps.sh fetches one)"
    )]
    ModuleNotFound { name: String, dir: PathBuf },
    #[error(
        "kernel module {module} depends on {dependency}, which is neither under {dir} nor in \
         its modules.builtin: the modules tree is incomplete; reinstall the kernel"
    )]
    MissingDependency {
        module: String,
        dependency: String,
        dir: PathBuf,
    },
    #[error("kernel modules depend on each other in a cycle: {cycle}")]
    DependencyCycle { cycle: String },
    #[error(
        "{path}: compressed modules are not supported yet; use a kernel built with \
         CONFIG_MODULE_COMPRESS_NONE (like the one scripts/install-host-deps.sh fetches)"
    )]
    CompressedModule { path: PathBuf },
    #[error("reading kernel module {path}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel module {path} was built for kernel {vermagic}, but the guest kernel is \
         {release}: point the kernel path at a kernel with its own modules/ directory"
    )]
    WrongKernel {
        path: PathBuf,
        vermagic: String,
        release: String,
    },
    #[error("reading the guest init binary {path} (is hangar-init built?)")]
    ReadInit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the initramfs {path}")]
    WriteInitramfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A guest kernel and the modules built with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The bzImage, with symlinks resolved: a later change of `current` does not change the
    /// kernel of a VM already set up (a restore needs the kernel it was booted with).
    pub vmlinuz: PathBuf,
    /// The `lib/modules/<uname>` tree; `None` for a kernel with everything built in.
    pub modules: Option<PathBuf>,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

impl Kernel {
    /// Finds the guest kernel: `explicit` (from the config) wins, with its modules in a sibling
    /// `modules/` directory if there is one; else `<data_dir>/vm/kernels/current`; else the
    /// kernel `scripts/install-host-deps.sh` installs in `/var/lib/hangar/vm/kernels/current`.
    pub fn locate(explicit: Option<&Path>, data_dir: &Path) -> Result<Kernel, VmAssetError> {
        if let Some(path) = explicit {
            if !path.is_file() {
                return Err(VmAssetError::ExplicitKernel { path: path.into() });
            }
            let vmlinuz = canonical(path)?;
            let dir = vmlinuz.parent().unwrap_or(Path::new("/"));
            let modules = Some(dir.join("modules")).filter(|m| m.is_dir());
            let release = bzimage_release(&vmlinuz).unwrap_or_else(|| release_from_name(&vmlinuz));
            return Ok(Kernel {
                vmlinuz,
                modules,
                release,
            });
        }
        let in_data_dir = data_dir.join("vm/kernels/current");
        let system = Path::new(SYSTEM_KERNELS).join("current");
        for current in [&in_data_dir, &system] {
            if !current.join("vmlinuz").is_file() {
                continue;
            }
            // The real directory is named after the release; `current` is only a pointer.
            let dir = canonical(current)?;
            let modules = Some(dir.join("modules")).filter(|m| m.is_dir());
            let vmlinuz = dir.join("vmlinuz");
            let release = bzimage_release(&vmlinuz).unwrap_or_else(|| file_name(&dir));
            return Ok(Kernel {
                vmlinuz,
                modules,
                release,
            });
        }
        Err(VmAssetError::NoKernel {
            data_dir: in_data_dir.join("vmlinuz"),
            system: system.join("vmlinuz"),
        })
    }
}

fn canonical(path: &Path) -> Result<PathBuf, VmAssetError> {
    std::fs::canonicalize(path).map_err(|source| VmAssetError::ResolveKernel {
        path: path.into(),
        source,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A release for a kernel whose image names none: `vmlinuz-<release>`, else the directory.
fn release_from_name(vmlinuz: &Path) -> String {
    let name = file_name(vmlinuz);
    match name.strip_prefix("vmlinuz-") {
        Some(release) => release.to_string(),
        None => vmlinuz.parent().map(file_name).unwrap_or(name),
    }
}

/// The release a bzImage was built as: the first word of the version string its setup header
/// points at (x86 boot protocol: magic `HdrS` at 0x202, string offset at 0x20e, relative to
/// 0x200; the string lies in the setup code, which is at most 64 KiB). `None` for anything else
/// (an ELF `vmlinux`, a truncated file).
fn bzimage_release(vmlinuz: &Path) -> Option<String> {
    let mut head = vec![0u8; 0x10000];
    let mut file = std::fs::File::open(vmlinuz).ok()?;
    let mut len = 0;
    while len < head.len() {
        match file.read(&mut head[len..]).ok()? {
            0 => break,
            n => len += n,
        }
    }
    head.truncate(len);
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]) as usize + 0x200;
    let text = head.get(offset..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&text[..end]).ok()?;
    (!release.is_empty()).then(|| release.to_string())
}

/// A module file to load in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The name as the file has it, without `.ko` (`virtio_ring`).
    pub name: String,
    pub path: PathBuf,
}

/// The strings of a module's `.modinfo` that loading order depends on.
#[derive(Debug, Default, PartialEq, Eq)]
struct ModInfo {
    depends: Vec<String>,
    /// `softdep=pre:` names: modules that should load first if they exist at all.
    soft_pre: Vec<String>,
    vermagic: Option<String>,
}

/// Reads the `key=value` strings of a module's `.modinfo` section. They are NUL-separated in
/// the file, so splitting the whole file at NULs finds them without parsing the ELF; the first
/// `depends=` and `vermagic=` are the section's (every module of the Debian kernel has exactly
/// one of each).
fn parse_modinfo(bytes: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    let mut seen_depends = false;
    for piece in bytes.split(|&b| b == 0) {
        if let Some(value) = piece.strip_prefix(b"depends=") {
            if !seen_depends {
                seen_depends = true;
                info.depends = String::from_utf8_lossy(value)
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect();
            }
        } else if let Some(value) = piece.strip_prefix(b"softdep=") {
            // `pre: a b post: c`: only the `pre:` names must be loaded first.
            let mut pre = false;
            for word in String::from_utf8_lossy(value).split_whitespace() {
                match word {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    name if pre => info.soft_pre.push(name.to_string()),
                    _ => {}
                }
            }
        } else if let Some(value) = piece.strip_prefix(b"vermagic=") {
            if info.vermagic.is_none() {
                let text = String::from_utf8_lossy(value);
                info.vermagic = text.split_whitespace().next().map(str::to_string);
            }
        }
    }
    info
}

/// Module names treat `-` and `_` as the same character, as the kernel does.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module files under `<dir>/kernel`, by normalized name, and the built-in modules.
struct ModuleTree {
    dir: PathBuf,
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleTree {
    fn read(dir: &Path) -> Result<ModuleTree, VmAssetError> {
        let err = |source| VmAssetError::ReadModulesTree {
            path: dir.into(),
            source,
        };
        let mut found = Vec::new();
        // A tree without `kernel/` is a kernel with every module built in.
        match walk(&dir.join("kernel"), &mut found) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        // Sorted, so that if two files claim one name the choice does not depend on the
        // directory order of the filesystem.
        found.sort();
        let mut files = HashMap::new();
        for path in found {
            if let Some(stem) = module_stem(&path) {
                files.entry(normalize(&stem)).or_insert(path);
            }
        }
        let builtin = match std::fs::read_to_string(dir.join("modules.builtin")) {
            Ok(text) => text
                .lines()
                .filter_map(|line| module_stem(Path::new(line.trim())))
                .map(|stem| normalize(&stem))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(err(e)),
        };
        Ok(ModuleTree {
            dir: dir.into(),
            files,
            builtin,
        })
    }
}

/// `name` for `…/name.ko`, `name.ko.xz` or `name.ko.zst`.
fn module_stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .map(str::to_string)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// Resolves `wanted` module names to files under `modules_dir` (a `lib/modules/<uname>` tree)
/// in an order that loads every dependency first, adding dependencies not in `wanted`. Built-in
/// modules are left out; a module that is neither a file nor built in is an error.
pub fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, VmAssetError> {
    let tree = ModuleTree::read(modules_dir)?;
    let mut order = Resolver {
        tree: &tree,
        done: HashSet::new(),
        visiting: Vec::new(),
        out: Vec::new(),
    };
    for name in wanted {
        order.visit(name, None)?;
    }
    Ok(order.out)
}

/// A depth-first walk emitting each module after its dependencies: with no dependency out of
/// place, the result is `wanted` in its own order.
struct Resolver<'a> {
    tree: &'a ModuleTree,
    done: HashSet<String>,
    /// The chain of modules being visited, for naming a cycle.
    visiting: Vec<String>,
    out: Vec<Module>,
}

impl Resolver<'_> {
    /// Visits `name`, needed by `needed_by` (`None` for a wanted module).
    fn visit(&mut self, name: &str, needed_by: Option<&str>) -> Result<(), VmAssetError> {
        let key = normalize(name);
        if self.done.contains(&key) {
            return Ok(());
        }
        if let Some(start) = self.visiting.iter().position(|v| normalize(v) == key) {
            let mut cycle = self.visiting[start..].to_vec();
            cycle.push(name.to_string());
            return Err(VmAssetError::DependencyCycle {
                cycle: cycle.join(" -> "),
            });
        }
        let Some(path) = self.tree.files.get(&key) else {
            if self.tree.builtin.contains(&key) {
                self.done.insert(key);
                return Ok(());
            }
            let dir = self.tree.dir.clone();
            return Err(match needed_by {
                None => VmAssetError::ModuleNotFound {
                    name: name.into(),
                    dir,
                },
                Some(module) => VmAssetError::MissingDependency {
                    module: module.into(),
                    dependency: name.into(),
                    dir,
                },
            });
        };
        if path.extension().is_some_and(|ext| ext != "ko") {
            return Err(VmAssetError::CompressedModule { path: path.clone() });
        }
        let bytes = std::fs::read(path).map_err(|source| VmAssetError::ReadModule {
            path: path.clone(),
            source,
        })?;
        let info = parse_modinfo(&bytes);
        let path = path.clone();
        let file_name = module_stem(&path).unwrap_or_else(|| name.to_string());
        self.visiting.push(file_name.clone());
        for dep in &info.depends {
            self.visit(dep, Some(&file_name))?;
        }
        // A soft dependency is loaded first when the tree has it and skipped when it does not:
        // its names are often aliases (`crc32c`) that the built-in code already provides.
        for dep in &info.soft_pre {
            if self.tree.files.contains_key(&normalize(dep)) {
                self.visit(dep, Some(&file_name))?;
            }
        }
        self.visiting.pop();
        self.done.insert(key);
        self.out.push(Module {
            name: file_name,
            path,
        });
        Ok(())
    }
}

/// Builds the initramfs for `kernel` with `init_binary` as `/init`, once: it is cached in
/// `cache_dir` under a hash of everything it contains, and a later call with the same inputs
/// returns the cached file. Cached files of other inputs are removed.
pub fn build(
    init_binary: &Path,
    kernel: &Kernel,
    cache_dir: &Path,
) -> Result<PathBuf, VmAssetError> {
    let init = std::fs::read(init_binary).map_err(|source| VmAssetError::ReadInit {
        path: init_binary.into(),
        source,
    })?;
    let modules = match &kernel.modules {
        Some(dir) => resolve_modules(dir, GUEST_MODULES)?,
        None => Vec::new(),
    };
    // Checked against the image's own version string: modules of another kernel would only
    // fail inside the guest, as an "Exec format error" on the serial console.
    let release = bzimage_release(&kernel.vmlinuz);
    let mut files = Vec::with_capacity(modules.len());
    for (i, module) in modules.iter().enumerate() {
        let bytes = std::fs::read(&module.path).map_err(|source| VmAssetError::ReadModule {
            path: module.path.clone(),
            source,
        })?;
        if let (Some(release), Some(vermagic)) = (&release, parse_modinfo(&bytes).vermagic) {
            if *release != vermagic {
                return Err(VmAssetError::WrongKernel {
                    path: module.path.clone(),
                    vermagic,
                    release: release.clone(),
                });
            }
        }
        files.push((format!("{:02}-{}.ko", i + 1, module.name), bytes));
    }

    let mut hash = Sha256::new();
    for part in [LAYOUT_VERSION, &init, kernel.release.as_bytes()] {
        hash_part(&mut hash, part);
    }
    for (name, bytes) in &files {
        hash_part(&mut hash, name.as_bytes());
        hash_part(&mut hash, bytes);
    }
    let digest = hex::encode(hash.finalize());
    let path = cache_dir.join(format!("initramfs-{}.cpio", &digest[..16]));
    if path.is_file() {
        return Ok(path);
    }

    let write_err = |source| VmAssetError::WriteInitramfs {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(write_err)?;
    // Written under a unique name, then renamed: a concurrent builder or a VM start never
    // sees half an archive.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = cache_dir.join(format!(
        ".initramfs-{}.{}.{seq}.tmp",
        &digest[..16],
        std::process::id()
    ));
    let written = write_initramfs(&tmp, &init, &files);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    remove_stale(cache_dir, &path);
    Ok(path)
}

fn hash_part(hash: &mut Sha256, part: &[u8]) {
    // Length-prefixed, so that moving bytes from one part to the next changes the hash.
    hash.update((part.len() as u64).to_le_bytes());
    hash.update(part);
}

fn write_initramfs(path: &Path, init: &[u8], modules: &[(String, Vec<u8>)]) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut cpio = Newc::new(io::BufWriter::new(file));
    for dir in BASE_DIRS {
        cpio.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for /init's stdio before anything can mount devtmpfs.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.file("init", init, 0o755)?;
    let mut order = String::new();
    for (name, bytes) in modules {
        cpio.file(&format!("{MODULES_DIR}/{name}"), bytes, 0o644)?;
        order.push_str(name);
        order.push('\n');
    }
    cpio.file(ORDER_FILE, order.as_bytes(), 0o644)?;
    let file = cpio.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Removes cached initramfs files other than `keep`, and temporary files a crashed builder
/// left behind (old enough that no builder is still writing them).
fn remove_stale(cache_dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = if name.starts_with("initramfs-") && name.ends_with(".cpio") {
            path != keep
        } else if name.starts_with(".initramfs-") && name.ends_with(".tmp") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600))
        } else {
            false
        };
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A standalone newc archive of `files` (path in the archive, contents, permission bits) with
/// the directories they need. The driver appends it to a copy of the initramfs for one VM
/// start; the kernel unpacks concatenated archives in turn, so these files land beside the
/// initramfs's own (e.g. `hangar/init.json`, mode 0600).
pub fn config_archive(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut cpio = Newc::new(Vec::new());
    let mut dirs = HashSet::new();
    // Writes into a Vec fail only for an empty path or a file over 4 GiB: the driver's paths
    // are constants and its configuration is kilobytes.
    let expect = "config archive paths are non-empty and files small";
    for (path, bytes, mode) in files {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if dirs.insert(parent.clone()) {
                cpio.dir(&parent, 0o700).expect(expect);
            }
        }
        cpio.file(path, bytes, *mode).expect(expect);
    }
    cpio.finish().expect(expect)
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// A writer of cpio "newc" archives (the format the kernel unpacks as an initramfs): each entry
/// is a 110-byte ASCII header, the NUL-terminated name and the data, each padded to 4 bytes.
/// Owners are root and times are zero, so the same inputs give the same bytes.
struct Newc<W> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Newc<W> {
    fn new(out: W) -> Self {
        Newc {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Ends the archive with the `TRAILER!!!` entry.
    fn finish(mut self) -> io::Result<W> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: over 4 GiB"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        self.header(ino, mode, nlink, size, rdev, name)?;
        self.put(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        if name.is_empty() || name.contains('\0') {
            let msg = format!("bad archive path {name:?}");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
        let name_size = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}\
             {:08x}{:08x}{name_size:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        debug_assert_eq!(header.len(), 110);
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// One entry of a parsed archive: name, mode, (rdev major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses newc archives (concatenated ones too) back into their entries, checking the
    /// framing on the way; the trailers are left out.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let field = |h: &[u8], i: usize| {
            let text = std::str::from_utf8(&h[6 + i * 8..6 + i * 8 + 8]).unwrap();
            u32::from_str_radix(text, 16).unwrap()
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[..6], b"070701", "bad magic");
            let h = &bytes[..110];
            let (mode, size, name_size) =
                (field(h, 1), field(h, 6) as usize, field(h, 11) as usize);
            let name = std::str::from_utf8(&bytes[110..110 + name_size - 1]).unwrap();
            assert_eq!(bytes[110 + name_size - 1], 0, "name not NUL-terminated");
            let data_start = align(110 + name_size);
            let data = bytes[data_start..data_start + size].to_vec();
            let next = align(data_start + size);
            if name != "TRAILER!!!" {
                out.push((name.to_string(), mode, (field(h, 9), field(h, 10)), data));
            }
            bytes = &bytes[next..];
        }
        out
    }

    /// The names `cpio -it` lists for `archive`.
    fn cpio_list(archive: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, archive).unwrap();
        let out = Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&path)
            .output()
            .expect("running cpio (apt-get install cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn newc_round_trip() {
        let mut cpio = Newc::new(Vec::new());
        cpio.dir("dev", 0o755).unwrap();
        cpio.char_dev("dev/console", 0o600, 5, 1).unwrap();
        cpio.file("init", b"#!hello", 0o755).unwrap();
        cpio.file("empty", b"", 0o644).unwrap();
        cpio.file("abcd", b"1234", 0o600).unwrap();
        let archive = cpio.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);

        let entries = parse(&archive);
        let expect: Vec<Entry> = vec![
            ("dev".into(), S_IFDIR | 0o755, (0, 0), vec![]),
            ("dev/console".into(), S_IFCHR | 0o600, (5, 1), vec![]),
            ("init".into(), S_IFREG | 0o755, (0, 0), b"#!hello".to_vec()),
            ("empty".into(), S_IFREG | 0o644, (0, 0), vec![]),
            ("abcd".into(), S_IFREG | 0o600, (0, 0), b"1234".to_vec()),
        ];
        assert_eq!(entries, expect);
        assert_eq!(
            cpio_list(&archive),
            ["dev", "dev/console", "init", "empty", "abcd"]
        );

        // An archive with its contents extracted by the system cpio matches byte for byte.
        let dir = tempfile::tempdir().unwrap();
        let mut cpio = Newc::new(Vec::new());
        cpio.dir("d", 0o755).unwrap();
        cpio.file("d/f", b"contents\n", 0o640).unwrap();
        let archive = cpio.finish().unwrap();
        let mut child = Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.path().join("d/f")).unwrap(),
            b"contents\n"
        );
    }

    #[test]
    fn newc_rejects_bad_names() {
        let mut cpio = Newc::new(Vec::new());
        assert!(cpio.file("", b"", 0o644).is_err());
        assert!(cpio.file("a\0b", b"", 0o644).is_err());
    }

    #[test]
    fn config_archive_has_parents_and_concatenates() {
        let config = config_archive(&[
            ("hangar/init.json", b"{\"a\":1}", 0o600),
            ("/hangar/extra/x", b"x", 0o644),
        ]);
        assert_eq!(config.len() % 4, 0);
        let entries = parse(&config);
        let names: Vec<(&str, u32)> = entries.iter().map(|e| (e.0.as_str(), e.1)).collect();
        assert_eq!(
            names,
            [
                ("hangar", S_IFDIR | 0o700),
                ("hangar/init.json", S_IFREG | 0o600),
                ("hangar/extra", S_IFDIR | 0o700),
                ("hangar/extra/x", S_IFREG | 0o644),
            ]
        );
        assert_eq!(entries[1].3, b"{\"a\":1}");

        // Appended to another archive, both parse in turn (as the kernel unpacks them).
        let mut base = Newc::new(Vec::new());
        base.file("init", b"i", 0o755).unwrap();
        let mut both = base.finish().unwrap();
        both.extend_from_slice(&config);
        let names: Vec<String> = parse(&both).into_iter().map(|e| e.0).collect();
        assert_eq!(names[0], "init");
        assert_eq!(
            names[1..],
            [
                "hangar",
                "hangar/init.json",
                "hangar/extra",
                "hangar/extra/x"
            ]
        );
        assert_eq!(
            cpio_list(&config),
            [
                "hangar",
                "hangar/init.json",
                "hangar/extra",
                "hangar/extra/x"
            ]
        );
    }

    #[test]
    fn parses_modinfo_strings() {
        let bytes = b"\x7fELF junk\0license=GPL\0depends=virtio, virtio_ring\0softdep=pre: crc32c \
                      md5 post: x\0vermagic=6.1.0-56-cloud-amd64 SMP mod_unload\0name=m\0";
        assert_eq!(
            parse_modinfo(bytes),
            ModInfo {
                depends: vec!["virtio".into(), "virtio_ring".into()],
                soft_pre: vec!["crc32c".into(), "md5".into()],
                vermagic: Some("6.1.0-56-cloud-amd64".into()),
            }
        );
        assert_eq!(parse_modinfo(b"depends=\0"), ModInfo::default());
    }

    /// A synthetic `lib/modules/<uname>` tree: each module is `(path under kernel/, depends,
    /// softdep)`, with `builtin` names in modules.builtin.
    fn tree(modules: &[(&str, &str, &str)], builtin: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, depends, softdep) in modules {
            let path = dir.path().join("kernel").join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut bytes = b"\x7fELF\x02\x01\x01 code".to_vec();
            bytes.extend_from_slice(format!("\0depends={depends}\0").as_bytes());
            if !softdep.is_empty() {
                bytes.extend_from_slice(format!("softdep={softdep}\0").as_bytes());
            }
            bytes.extend_from_slice(b"vermagic=6.1.0-test SMP\0name=x\0");
            std::fs::write(path, bytes).unwrap();
        }
        let builtin: String = builtin.iter().map(|b| format!("kernel/{b}.ko\n")).collect();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        dir
    }

    /// Resolves `wanted` in a tree of `modules` and `builtin`; `expect` is the load order, or
    /// `Err` with a piece of the error message.
    #[track_caller]
    fn check(
        modules: &[(&str, &str, &str)],
        builtin: &[&str],
        wanted: &[&str],
        expect: Result<&[&str], &str>,
    ) {
        let dir = tree(modules, builtin);
        let got = resolve_modules(dir.path(), wanted);
        match (got, expect) {
            (Ok(got), Ok(expect)) => {
                let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
                assert_eq!(names, expect);
                for m in &got {
                    assert!(m.path.starts_with(dir.path().join("kernel")), "{m:?}");
                }
            }
            (Err(e), Err(expect)) => {
                let msg = e.to_string();
                assert!(msg.contains(expect), "{msg:?} does not contain {expect:?}");
            }
            (got, expect) => panic!("got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn module_order() {
        let virtio = [
            ("drivers/virtio/virtio_ring.ko", "", ""),
            ("drivers/virtio/virtio.ko", "virtio_ring", ""),
            ("drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring", ""),
            ("drivers/block/virtio_blk.ko", "virtio,virtio_ring", ""),
        ];
        // In the wanted order when it already loads dependencies first.
        check(
            &virtio,
            &[],
            &["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"],
            Ok(&["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]),
        );
        // Dependencies first, and added when not wanted.
        check(
            &virtio,
            &[],
            &["virtio_blk", "virtio_mmio"],
            Ok(&["virtio_ring", "virtio", "virtio_blk", "virtio_mmio"]),
        );
        // `-` and `_` are the same in names, in both directions.
        check(
            &[
                ("a/crc32c-intel.ko", "", ""),
                ("a/b.ko", "crc32c_intel", ""),
            ],
            &[],
            &["b"],
            Ok(&["crc32c-intel", "b"]),
        );
        // Built-in modules, wanted or depended on, are skipped.
        check(
            &[("fs/erofs/erofs.ko", "libcrc32c", "")],
            &["lib/libcrc32c", "fs/overlayfs/overlay"],
            &["overlay", "libcrc32c", "erofs"],
            Ok(&["erofs"]),
        );
        // A soft dependency that is a module loads first; one that is not (an alias) is skipped.
        check(
            &[
                ("lib/libcrc32c.ko", "", "pre: crc32c"),
                ("x/zz.ko", "", "pre: yy post: ww"),
                ("x/yy.ko", "", ""),
            ],
            &[],
            &["libcrc32c", "zz"],
            Ok(&["libcrc32c", "yy", "zz"]),
        );
        // Missing: a wanted module, a dependency.
        check(
            &virtio,
            &[],
            &["virtio_blk", "erofs"],
            Err("the guest needs kernel module erofs, which is neither under"),
        );
        check(
            &[("fs/erofs/erofs.ko", "libcrc32c", "")],
            &[],
            &["erofs"],
            Err("kernel module erofs depends on libcrc32c, which is neither under"),
        );
        // Cycles, named in full.
        check(
            &[("a.ko", "b", ""), ("b.ko", "c", ""), ("c.ko", "a", "")],
            &[],
            &["a"],
            Err("cycle: a -> b -> c -> a"),
        );
        check(&[("a.ko", "a", "")], &[], &["a"], Err("cycle: a -> a"));
        // Compressed modules are found, and refused with a clear error.
        check(
            &[("a.ko.zst", "", "")],
            &[],
            &["a"],
            Err("compressed modules are not supported yet"),
        );
    }

    #[test]
    fn locate_prefers_explicit_then_data_dir() {
        let data = tempfile::tempdir().unwrap();
        let kernels = data.path().join("vm/kernels");
        std::fs::create_dir_all(kernels.join("6.1.0-test/modules")).unwrap();
        std::fs::write(kernels.join("6.1.0-test/vmlinuz"), b"not a bzImage").unwrap();
        std::os::unix::fs::symlink("6.1.0-test", kernels.join("current")).unwrap();
        let real = std::fs::canonicalize(kernels.join("6.1.0-test")).unwrap();
        assert_eq!(
            Kernel::locate(None, data.path()).unwrap(),
            Kernel {
                vmlinuz: real.join("vmlinuz"),
                modules: Some(real.join("modules")),
                release: "6.1.0-test".into(),
            }
        );

        let other = tempfile::tempdir().unwrap();
        let explicit = other.path().join("vmlinuz-5.10.0-x");
        std::fs::write(&explicit, b"also not a bzImage").unwrap();
        let real_other = std::fs::canonicalize(other.path()).unwrap();
        assert_eq!(
            Kernel::locate(Some(&explicit), data.path()).unwrap(),
            Kernel {
                vmlinuz: real_other.join("vmlinuz-5.10.0-x"),
                modules: None,
                release: "5.10.0-x".into(),
            }
        );

        let missing = other.path().join("nope");
        let err = Kernel::locate(Some(&missing), data.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("scripts/install-host-deps.sh"), "{msg}");
    }

    #[test]
    fn reads_the_release_from_a_bzimage_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz");
        let mut image = vec![0u8; 0x600];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let version = b"6.1.0-9-test (someone@example) #1 SMP";
        image[0x500..0x500 + version.len()].copy_from_slice(version);
        std::fs::write(&path, &image).unwrap();
        assert_eq!(bzimage_release(&path).as_deref(), Some("6.1.0-9-test"));
        std::fs::write(&path, &image[..0x300]).unwrap();
        assert_eq!(bzimage_release(&path), None);
    }

    #[test]
    fn build_caches_and_lays_out_the_archive() {
        let modules = tree(
            &[
                ("drivers/virtio/virtio_ring.ko", "", ""),
                ("drivers/virtio/virtio.ko", "virtio_ring", ""),
                ("drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring", ""),
                ("drivers/block/virtio_blk.ko", "virtio,virtio_ring", ""),
                ("drivers/char/virtio_console.ko", "virtio,virtio_ring", ""),
                ("fs/erofs/erofs.ko", "libcrc32c", ""),
            ],
            &[
                "fs/overlayfs/overlay",
                "lib/libcrc32c",
                "drivers/virtio/virtio_balloon",
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("hangar-init");
        std::fs::write(&init, b"\x7fELF init").unwrap();
        let vmlinuz = dir.path().join("vmlinuz");
        std::fs::write(&vmlinuz, b"kernel").unwrap();
        let kernel = Kernel {
            vmlinuz,
            modules: Some(modules.path().into()),
            release: "6.1.0-test".into(),
        };
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("initramfs-0000000000000000.cpio"), b"old").unwrap();

        let path = build(&init, &kernel, &cache).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("initramfs-") && name.len() == "initramfs-.cpio".len() + 16);
        let listing: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            listing,
            [name.as_str()],
            "the old archive is removed, no temp file is left"
        );

        let archive = std::fs::read(&path).unwrap();
        let expect_names = [
            "dev",
            "proc",
            "sys",
            "run",
            "mnt",
            "lib",
            "lib/modules",
            "lib/modules/hangar",
            "dev/console",
            "init",
            "lib/modules/hangar/01-virtio_ring.ko",
            "lib/modules/hangar/02-virtio.ko",
            "lib/modules/hangar/03-virtio_mmio.ko",
            "lib/modules/hangar/04-virtio_blk.ko",
            "lib/modules/hangar/05-virtio_console.ko",
            "lib/modules/hangar/06-erofs.ko",
            "lib/modules/hangar/order",
        ];
        assert_eq!(cpio_list(&archive), expect_names);
        let entries = parse(&archive);
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("init").1, S_IFREG | 0o755);
        assert_eq!(get("init").3, b"\x7fELF init");
        assert_eq!(get("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").2, (5, 1));
        assert_eq!(
            String::from_utf8(get("lib/modules/hangar/order").3.clone()).unwrap(),
            "01-virtio_ring.ko\n02-virtio.ko\n03-virtio_mmio.ko\n04-virtio_blk.ko\n\
             05-virtio_console.ko\n06-erofs.ko\n"
        );

        // Cached: the same inputs give the same file without writing it again.
        std::fs::write(&path, b"marker").unwrap();
        assert_eq!(build(&init, &kernel, &cache).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), b"marker");
        // Another init binary is another archive, and replaces the old one.
        std::fs::write(&init, b"\x7fELF init 2").unwrap();
        let path2 = build(&init, &kernel, &cache).unwrap();
        assert_ne!(path2, path);
        assert!(!path.exists());
        // A kernel without modules gets an archive with an empty order file.
        let bare = Kernel {
            modules: None,
            ..kernel
        };
        let archive = std::fs::read(build(&init, &bare, &cache).unwrap()).unwrap();
        let entries = parse(&archive);
        assert_eq!(entries.iter().find(|e| e.0 == ORDER_FILE).unwrap().3, b"");
    }

    #[test]
    fn build_refuses_modules_of_another_kernel() {
        let modules = tree(
            &[
                ("drivers/virtio/virtio_ring.ko", "", ""),
                ("drivers/virtio/virtio.ko", "virtio_ring", ""),
            ],
            &[
                "drivers/virtio/virtio_mmio",
                "drivers/block/virtio_blk",
                "drivers/char/virtio_console",
                "fs/overlayfs/overlay",
                "lib/libcrc32c",
                "fs/erofs/erofs",
                "drivers/virtio/virtio_balloon",
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        std::fs::write(&init, b"init").unwrap();
        let vmlinuz = dir.path().join("vmlinuz");
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        image[0x300..0x308].copy_from_slice(b"6.2.0-x ");
        std::fs::write(&vmlinuz, &image).unwrap();
        let kernel = Kernel {
            vmlinuz,
            modules: Some(modules.path().into()),
            release: "6.2.0-x".into(),
        };
        let err = build(&init, &kernel, &dir.path().join("cache")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("built for kernel 6.1.0-test") && msg.contains("6.2.0-x"),
            "{msg}"
        );
    }

    /// The kernel `scripts/install-host-deps.sh` installs: its real modules resolve to the
    /// order the guest was measured to load them in (docs/vm-driver-notes.md).
    #[test]
    fn real_kernel_module_order() {
        let data = tempfile::tempdir().unwrap();
        let kernel = Kernel::locate(None, data.path()).unwrap_or_else(|e| {
            panic!(
                "this test needs the guest kernel in {SYSTEM_KERNELS}/current: run \
                 scripts/install-host-deps.sh as root ({e})"
            )
        });
        let modules = kernel.modules.clone().unwrap_or_else(|| {
            panic!(
                "{} has no modules/ directory: run scripts/install-host-deps.sh as root",
                kernel.vmlinuz.display()
            )
        });
        let dir = std::fs::canonicalize(Path::new(SYSTEM_KERNELS).join("current")).unwrap();
        assert_eq!(kernel.release, file_name(&dir));
        assert_eq!(
            bzimage_release(&kernel.vmlinuz).as_deref(),
            Some(kernel.release.as_str())
        );

        let order = resolve_modules(&modules, GUEST_MODULES).unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "virtio_balloon",
                "overlay",
                "libcrc32c",
                "erofs"
            ]
        );

        // The whole initramfs builds (the vermagic of every module matches the kernel), and
        // the system cpio lists the modules in load order.
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        std::fs::write(&init, b"init").unwrap();
        let path = build(&init, &kernel, dir.path()).unwrap();
        let listed = cpio_list(&std::fs::read(&path).unwrap());
        let modules: Vec<&str> = listed
            .iter()
            .filter_map(|n| n.strip_prefix("lib/modules/hangar/"))
            .filter(|n| n.ends_with(".ko"))
            .collect();
        assert_eq!(
            modules,
            [
                "01-virtio_ring.ko",
                "02-virtio.ko",
                "03-virtio_mmio.ko",
                "04-virtio_blk.ko",
                "05-virtio_console.ko",
                "06-virtio_balloon.ko",
                "07-overlay.ko",
                "08-libcrc32c.ko",
                "09-erofs.ko"
            ]
        );
    }
}
