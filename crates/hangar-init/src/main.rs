//! `hangar-init`: PID 1 in every Hangar sandbox. All the work is in the library; see `lib.rs`.

fn main() {
    std::process::exit(hangar_init::startup::main());
}
