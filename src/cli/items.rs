//! `fanjet items put`: a fanout's items as an object, for a fanout of
//! millions (a job's input, or a step's result, is limited to 1 MiB inline).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::objects;
use fanjet::protocol::{ItemsFormat, RESULTS_BUCKET};

#[derive(Subcommand)]
pub enum ItemsCommand {
    /// Stores items in the object store and prints the reference to give as
    /// a job's input (or to return as a step's result): a fanout over it
    /// reads the items a buffer at a time, never decoding them whole.
    ///
    /// `fanjet submit WORKFLOW --input "$(fanjet items put items.jsonl)"`.
    /// The items are checked (a JSON array, or one JSON value per line) and
    /// counted on the way; the reference carries the count and the object's
    /// digest. Needs a user that may write the `fanjet_results` object store
    /// (a worker or the manager role of nats/secure).
    Put(PutArgs),
}

#[derive(clap::Args)]
pub struct PutArgs {
    /// The items: a JSON array, or JSON lines; `-` for stdin.
    file: PathBuf,
    /// How they are written (default: `lines` for .jsonl and .ndjson files,
    /// else `json`).
    #[arg(long, value_enum)]
    format: Option<Format>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// One JSON array.
    Json,
    /// One JSON value per line.
    Lines,
}

pub async fn run(connect: &ConnectArgs, command: ItemsCommand) -> Result<u8> {
    match command {
        ItemsCommand::Put(args) => put(connect, args).await,
    }
}

async fn put(connect: &ConnectArgs, args: PutArgs) -> Result<u8> {
    let format = match args.format {
        Some(Format::Json) => ItemsFormat::Json,
        Some(Format::Lines) => ItemsFormat::Lines,
        None => match args.file.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => ItemsFormat::Lines,
            _ => ItemsFormat::Json,
        },
    };
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if args.file.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(&args.file)
                .await
                .with_context(|| format!("opening {}", args.file.display()))?,
        )
    };
    let reader = tokio::io::BufReader::with_capacity(256 * 1024, reader);
    let client = connect.connect("fanjet-items").await?;
    let js = async_nats::jetstream::new(client.clone());
    let reference = objects::put_items(&js, RESULTS_BUCKET, reader, format)
        .await
        .context("storing the items (is a manager running, so the object store exists?)")?;
    client.flush().await.ok();
    eprintln!(
        "stored {} items ({} bytes) as {}",
        reference.array_len.unwrap_or_default(),
        reference.size,
        reference.name
    );
    println!("{}", reference.to_value());
    Ok(0)
}
