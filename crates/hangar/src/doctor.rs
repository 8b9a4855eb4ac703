//! `hangar doctor`: which drivers work here, and the fix for each that doesn't.

use std::process::ExitCode;

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let data_dir = crate::default_data_dir();
    let init = std::env::var_os("HANGAR_INIT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .unwrap_or_default()
                .with_file_name("hangar-init")
        });
    let kernel = std::env::var_os("HANGAR_VM_KERNEL").map(std::path::PathBuf::from);
    let accel = crate::serve::vm_accel(&std::env::var("HANGAR_VM_ACCEL").unwrap_or_default());
    let vm = hangar_sandbox::vm::probe_vm(&data_dir, kernel.as_deref(), &init, accel);
    let probe = hangar_sandbox::probe_host(&vm);
    if json {
        println!("{}", serde_json::to_string_pretty(&probe)?);
    } else {
        println!("Host checks:");
        for c in &probe.checks {
            println!(
                "  {} {:<13} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                println!("       fix: {fix}");
            }
        }
        println!("\nDrivers:");
        for d in &probe.drivers {
            println!(
                "  {:<10} {:<13} {}",
                d.driver.as_str(),
                if d.available {
                    "available"
                } else {
                    "unavailable"
                },
                d.detail
            );
        }
        match probe.auto {
            Some(k) => println!("\n`auto` resolves to: {k}"),
            None => println!("\nNo driver works on this host: fix the checks above."),
        }
    }
    Ok(if probe.auto.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
