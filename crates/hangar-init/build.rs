//! Makes the `hangar-init` binary a static executable, and touches nothing else.
//!
//! `hangar-init` is bind-mounted into arbitrary images (busybox, distroless, ...) that may have no
//! glibc at all, so it must not need a dynamic loader. Only the `x86_64-unknown-linux-gnu` target
//! is available, and `-C target-feature=+crt-static` cannot be scoped to one crate without also
//! changing every other binary and proc-macro in the workspace. So this script links only the
//! binary targets of this package statically, with two link arguments:
//!
//! * `-static-pie`: gcc links a self-relocating static PIE (rustc already passes `-pie`).
//! * `-L <OUT_DIR>/static-libs`: rustc asks for `-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc` in
//!   `-Bdynamic` mode, which would pull in the shared libraries despite `-static-pie`. That
//!   directory holds one tiny linker script per library, named `lib<name>.so` so that it is found
//!   before the system's shared library, which points the linker at the static archive instead
//!   (`libgcc_s` becomes `libgcc_eh` + `libgcc`, which provide the unwinder statically).
//!
//! It must never emit `rustc-link-search` or `rustc-link-arg` (without `-bins`): those would
//! reach this package's library and test targets too.

use std::path::PathBuf;

/// `(library rustc asks for, linker script body)`. `-l:NAME` names an exact file, so the
/// scripts never find themselves.
const SHIMS: &[(&str, &str)] = &[
    ("gcc_s", "GROUP ( -l:libgcc_eh.a -l:libgcc.a )"),
    ("c", "GROUP ( -l:libc.a -l:libgcc.a -l:libgcc_eh.a )"),
    ("m", "INPUT ( -l:libm.a )"),
    ("pthread", "INPUT ( -l:libpthread.a )"),
    ("dl", "INPUT ( -l:libdl.a )"),
    ("rt", "INPUT ( -l:librt.a )"),
    ("util", "INPUT ( -l:libutil.a )"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !(target.contains("linux") && target.ends_with("-gnu")) {
        // musl targets are static already; anything else is not supported as a sandbox.
        return;
    }
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("static-libs");
    std::fs::create_dir_all(&out).expect("create static-libs directory");
    for (name, body) in SHIMS {
        let text = format!("/* hangar-init: link lib{name} statically (see build.rs) */\n{body}\n");
        std::fs::write(out.join(format!("lib{name}.so")), text).expect("write linker script");
    }
    println!("cargo:rustc-link-arg-bins=-static-pie");
    println!("cargo:rustc-link-arg-bins=-L{}", out.display());
}
