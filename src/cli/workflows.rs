//! `fanjet workflow apply` and `fanjet workflow list`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use fanjet::nats::connect::ConnectArgs;
use fanjet::protocol::Workflow;

#[derive(Subcommand)]
pub enum WorkflowCommand {
    /// Validates TOML definitions and stores them (creating their step consumers).
    Apply { files: Vec<PathBuf> },
    /// Lists stored workflows.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(connect: &ConnectArgs, command: WorkflowCommand) -> Result<u8> {
    match command {
        WorkflowCommand::Apply { files } => apply(connect, files).await,
        WorkflowCommand::List { json } => list(connect, json).await,
    }
}

async fn apply(connect: &ConnectArgs, files: Vec<PathBuf>) -> Result<u8> {
    if files.is_empty() {
        bail!("give at least one workflow file");
    }
    let mut parsed = Vec::new();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        parsed.push(Workflow::from_toml(&text).with_context(|| format!("{}", f.display()))?);
    }
    let nats = super::connect_admin(connect, "fanjet-cli").await?;
    for w in parsed {
        nats.apply_workflow(&w).await?;
        println!("applied {} ({} steps)", w.name, w.steps.len());
    }
    Ok(0)
}

async fn list(connect: &ConnectArgs, json: bool) -> Result<u8> {
    let nats = super::connect(connect, "fanjet-cli").await?;
    let list = nats.workflows().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for w in list {
            let steps: Vec<String> = w
                .steps
                .iter()
                .map(|s| format!("{}({})", s.name, s.kind.as_str()))
                .collect();
            println!("{:<20} {}", w.name, steps.join(" -> "));
        }
    }
    Ok(0)
}
