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
    assert!(status.success(), "the chaos run found violations: {result}");
}
