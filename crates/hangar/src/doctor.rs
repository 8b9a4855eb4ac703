//! `hangar doctor`: which drivers work here, and the fix for each that doesn't.

use std::process::ExitCode;

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let probe = hangar_sandbox::probe_host(&crate::serve::LocalVm::from_env().probe());
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
