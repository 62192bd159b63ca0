//! `fanjet processes`: live managers with their partitions and workers
//! with their slots.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::heartbeat;
use fanjet::observe::processes::{processes, Processes};

// `fanjet processes`
#[derive(Args)]
pub struct ProcessesArgs {
    /// How long to listen for heartbeats.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    listen: Duration,
    #[arg(long)]
    json: bool,
}

pub async fn run(connect: &ConnectArgs, args: ProcessesArgs) -> Result<u8> {
    let nats = super::connect(connect, "fanjet-cli").await?;
    if !args.json {
        eprintln!(
            "listening for heartbeats for {}…",
            humantime::format_duration(args.listen)
        );
    }
    let beats = heartbeat::listen(&nats, args.listen).await?;
    let p = processes(&nats, beats).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", table(&p));
    }
    Ok(0)
}

/// Partition numbers as ranges: `0-7, 9, 12-15`.
fn ranges(ps: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ps.len() {
        let start = ps[i];
        while i + 1 < ps.len() && ps[i + 1] == ps[i] + 1 {
            i += 1;
        }
        out.push(if ps[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", ps[i])
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// The process list as text.
fn table(p: &Processes) -> String {
    let ago = |ms: Option<u64>| match ms {
        Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
        None => "not heard".into(),
    };
    let mut out = format!("managers ({})\n", p.managers.len());
    for m in &p.managers {
        out += &format!(
            "  {:<32} {:<16} partitions {:<16} ({:>2})  jobs {:>5}  {}\n",
            m.id,
            m.user.as_deref().unwrap_or("-"),
            ranges(&m.partitions),
            m.partitions.len(),
            m.jobs.map(|j| j.to_string()).unwrap_or_else(|| "-".into()),
            ago(m.seen_ms_ago)
        );
    }
    out += &format!("workers ({})\n", p.workers.len());
    for w in &p.workers {
        out += &format!(
            "  {:<32} {:<16} slots {:>4}  busy {:>4}  {}\n",
            w.id,
            w.user.as_deref().unwrap_or("-"),
            w.slots,
            w.busy,
            ago(Some(w.seen_ms_ago))
        );
    }
    match &p.leases_error {
        Some(e) => out += &format!("partitions unknown: {e}\n"),
        None if p.unowned_partitions.is_empty() => {
            out += "every partition has a manager\n";
        }
        None => {
            out += &format!(
                "partitions without a manager: {} (their jobs wait)\n",
                ranges(&p.unowned_partitions)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn partition_ranges_read_naturally() {
        assert_eq!(ranges(&[]), "none");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[0, 1, 2, 3, 5, 7, 8]), "0-3, 5, 7-8");
    }
}
