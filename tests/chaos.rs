//! The seeded chaos run (`just chaos`), two minutes with seed 7: a 3-node
//! cluster, three managers, `fanjet serve` and three worker processes under
//! a schedule of kills and freezes. It exits non-zero on any violation
//! (a job not terminal or with the wrong outcome, a subjob lost or counted
//! twice, statistics that differ from the record, a step started or
//! announced twice); its figures are printed and kept in result.json.

use std::process::Command;

#[test]
fn a_two_minute_chaos_run_finds_no_violation() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_fanjet-chaos"))
        .args(["--seed", "7", "--minutes", "2", "--out"])
        .arg(out.path())
        .env("FANJET_LOG", "warn")
        .status()
        .expect("run fanjet-chaos");
    let result = std::fs::read_to_string(out.path().join("result.json")).unwrap_or_default();
    eprintln!("{result}");
    if !status.success() {
        print_log_lines_of_violations(out.path(), &result);
    }
    assert!(status.success(), "the chaos run found violations: {result}");
}

/// The processes' log lines that name a job with a violation (at most 40
/// a job): the run's folder is removed with the test, and CI keeps only
/// what it printed.
fn print_log_lines_of_violations(out: &std::path::Path, result: &str) {
    let Ok(result) = serde_json::from_str::<serde_json::Value>(result) else {
        return;
    };
    let jobs: std::collections::BTreeSet<String> = result["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.split(':').next().map(str::to_string))
        .collect();
    let Ok(logs) = std::fs::read_dir(out.join("logs")) else {
        return;
    };
    let mut files: Vec<_> = logs.filter_map(|e| Some(e.ok()?.path())).collect();
    files.sort();
    for job in jobs {
        let mut lines = Vec::new();
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            lines.extend(
                text.lines()
                    .filter(|l| l.contains(&job))
                    .map(|l| format!("{name}: {l}")),
            );
        }
        eprintln!("log lines naming {job} ({} in all):", lines.len());
        for l in lines.iter().take(40) {
            eprintln!("  {l}");
        }
    }
}
