//! The results: a table on stdout (values and ratios to direct) and the JSON file.

use serde_json::{json, Value};

use crate::scenarios::{Plan, Table};
use crate::Cli;

/// Prints the table and writes the JSON results to `cli.out`.
pub fn write(cli: &Cli, plan: &Plan, names: &[&'static str], table: &Table) -> anyhow::Result<()> {
    print!("{:<40}", "scenario");
    for n in names {
        print!("{n:>18}");
    }
    println!();
    let mut rows = Vec::new();
    for (metric, by) in &table.0 {
        print!("{metric:<40}");
        let direct = by.get("direct").copied().unwrap_or(0.0);
        let mut row = json!({"metric": metric});
        for n in names {
            let v = by.get(n).copied().unwrap_or(0.0);
            let ratio = if direct > 0.0 { v / direct } else { 0.0 };
            if v.abs() < 10.0 {
                print!("{:>10.3} ({:>4.2}×)", v, ratio);
            } else {
                print!("{:>10.1} ({:>4.2}×)", v, ratio);
            }
            row[*n] = json!({"value": v, "ratio_to_direct": ratio});
        }
        println!();
        rows.push(row);
    }
    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "os": std::env::consts::OS,
    });
    let out: Value = json!({
        "smoke": cli.smoke,
        "runs": plan.runs,
        "secs_per_measurement": plan.dur.as_secs_f64(),
        "tunnel_bytes": plan.tunnel,
        "machine": machine,
        "targets": names,
        "results": rows,
    });
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
