//! `fanjet tenants`: customers' settings for the fair share (weight,
//! concurrency cap).

use anyhow::{bail, Result};
use clap::Subcommand;

use fanjet::nats::connect::ConnectArgs;
use fanjet::nats::tenants;
use fanjet::protocol::{validate_customer, Tenant};

#[derive(Subcommand)]
pub enum TenantsCommand {
    /// Sets a customer's weight and/or concurrency cap (others keep their value).
    ///
    /// Managers apply it within a tick (0.5 s). The weight says how many
    /// slots of a step the customer gets beside others that want more than
    /// there is (2: twice a customer of weight 1); the cap bounds its
    /// subjobs dispatched and unfinished, over all its jobs and steps.
    Set {
        customer: String,
        /// Weight against other customers (default 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: Option<u32>,
        /// Most subjobs of this customer running (dispatched and unfinished) at once.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_concurrency: Option<u64>,
        /// Remove the concurrency cap.
        #[arg(long, conflicts_with = "max_concurrency")]
        no_max_concurrency: bool,
    },
    /// Lists customers with settings.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forgets a customer's settings (weight 1, no cap).
    Remove { customer: String },
}

pub async fn run(connect: &ConnectArgs, command: TenantsCommand) -> Result<u8> {
    let nats = super::connect(connect, "fanjet-cli").await?;
    match command {
        TenantsCommand::Set {
            customer,
            weight,
            max_concurrency,
            no_max_concurrency,
        } => {
            validate_customer(&customer)?;
            if weight.is_none() && max_concurrency.is_none() && !no_max_concurrency {
                bail!("nothing to set: give --weight, --max-concurrency or --no-max-concurrency");
            }
            let mut t = tenants::get(&nats.js, &customer)
                .await?
                .unwrap_or_else(|| Tenant::new(&customer));
            if let Some(w) = weight {
                t.weight = w;
            }
            if max_concurrency.is_some() || no_max_concurrency {
                t.max_concurrency = max_concurrency;
            }
            tenants::put(&nats.js, &t).await?;
            println!("{}", show(&t));
        }
        TenantsCommand::List { json } => {
            let list = tenants::list(&nats.js).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no customer has settings: each has weight 1 and no cap");
            } else {
                for t in list {
                    println!("{}", show(&t));
                }
            }
        }
        TenantsCommand::Remove { customer } => {
            tenants::remove(&nats.js, &customer).await?;
            println!("{customer}: weight 1, no cap");
        }
    }
    Ok(0)
}

fn show(t: &Tenant) -> String {
    let cap = t
        .max_concurrency
        .map(|c| format!("max concurrency {c}"))
        .unwrap_or_else(|| "no cap".into());
    format!("{}: weight {}, {cap}", t.customer, t.weight)
}
