//! How every command connects to NATS: one set of flags and env vars.

use std::path::PathBuf;

use clap::Args;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot read credentials file {path}: {message}")]
    Creds { path: PathBuf, message: String },
}

/// NATS connection flags.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long = "server",
        short = 's',
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub server: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// User name (with --password).
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

impl ConnectArgs {
    /// Arguments pointing at `url` with no authentication.
    pub fn url(url: impl Into<String>) -> Self {
        ConnectArgs {
            server: url.into(),
            creds: None,
            user: None,
            password: None,
            token: None,
        }
    }

    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        let mut opts = async_nats::ConnectOptions::new().name(name);
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| ConnectError::Creds {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        }
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .server
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e: std::io::Error| ConnectError::Connect {
                url: self.server.clone(),
                message: e.to_string(),
            })?;
        opts.connect(urls).await.map_err(|e| ConnectError::Connect {
            url: self.server.clone(),
            message: e.to_string(),
        })
    }
}
