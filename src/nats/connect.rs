//! How every command connects to NATS: one set of flags and env vars.

use std::path::PathBuf;
use std::sync::OnceLock;

use tokio::sync::broadcast;

use clap::Args;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        url: String,
        message: String,
        /// The server may be there later (refused, timed out, DNS); not
        /// when the address, credentials or TLS setup are wrong.
        transient: bool,
    },
    #[error("cannot use credentials file {path}: {message}")]
    Creds { path: PathBuf, message: String },
}

impl ConnectError {
    /// True when connecting again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::Connect {
                transient: true,
                ..
            }
        )
    }
}

/// Permission violations the server reported to this process's
/// connections, for a command to say why a request went unanswered
/// instead of timing out.
fn refusals_sender() -> &'static broadcast::Sender<String> {
    static SENDER: OnceLock<broadcast::Sender<String>> = OnceLock::new();
    SENDER.get_or_init(|| broadcast::channel(64).0)
}

/// Permission violations reported from now on (the server's text, which
/// names the subject).
pub fn refusals() -> broadcast::Receiver<String> {
    refusals_sender().subscribe()
}

/// The `name` claim of the user JWT in a credentials file.
fn jwt_name(creds: &str) -> Option<String> {
    use base64::Engine;
    let jwt = creds
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.contains("BEGIN NATS USER JWT"))
        .nth(1)?;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("name")?.as_str().map(str::to_string)
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
    /// NATS user name (with --password).
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// NATS authentication token (the HTTP API's is `fanjet serve --api-token`).
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding an NKey seed (SU...) to authenticate with.
    #[arg(long, env = "NATS_NKEY", global = true)]
    pub nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server's TLS certificate; implies TLS.
    #[arg(long, env = "NATS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --tls-key).
    #[arg(long, env = "NATS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with --tls-cert).
    #[arg(long, env = "NATS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Subject prefix of this connection's reply inboxes (default
    /// `_INBOX`). Give each NATS user its own (e.g. `_INBOX_acme`) and
    /// allow it only that one, so no user can read another's replies.
    #[arg(long, env = "NATS_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
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
            nkey: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            inbox_prefix: None,
        }
    }

    /// The name this process authenticates as, for the heartbeats' user
    /// token: the `--user`, else the name in the `--creds` file's JWT, else
    /// the public key of the `--nkey` seed; `None` without any.
    pub fn identity(&self) -> Option<String> {
        if let Some(user) = &self.user {
            return Some(user.clone());
        }
        if let Some(path) = &self.creds {
            return std::fs::read_to_string(path)
                .ok()
                .and_then(|text| jwt_name(&text));
        }
        let seed = std::fs::read_to_string(self.nkey.as_ref()?).ok()?;
        let seed = seed.lines().map(str::trim).find(|l| l.starts_with("SU"))?;
        nkeys::KeyPair::from_seed(seed).ok().map(|k| k.public_key())
    }

    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                let dropped = dropped.clone();
                async move {
                    match event {
                        async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                            if text.to_lowercase().contains("permissions violation") =>
                        {
                            tracing::debug!(error = %text, "the server refused an operation");
                            let _ = refusals_sender().send(text);
                        }
                        // The first connection is not news (a command
                        // line tool would print it); a reconnection is.
                        async_nats::Event::Disconnected => {
                            dropped.store(true, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!("lost the connection to NATS; reconnecting")
                        }
                        async_nats::Event::Connected
                            if dropped.load(std::sync::atomic::Ordering::Relaxed) =>
                        {
                            tracing::info!("connected to NATS again")
                        }
                        _ => {}
                    }
                }
            });
        if let Some(prefix) = &self.inbox_prefix {
            let valid = !prefix.is_empty()
                && prefix
                    .split('.')
                    .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '\t']));
            if !valid {
                return Err(ConnectError::Connect {
                    url: self.server.clone(),
                    message: format!(
                        "--inbox-prefix {prefix:?} is not a subject without wildcards"
                    ),
                    transient: false,
                });
            }
            opts = opts.custom_inbox_prefix(prefix);
        }
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
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path).map_err(|e| ConnectError::Creds {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("SU"))
                .ok_or_else(|| ConnectError::Creds {
                    path: path.clone(),
                    message: "no user NKey seed (a line starting with SU) in the file".into(),
                })?;
            opts = opts.nkey(seed.to_string());
        }
        for path in [&self.tls_ca, &self.tls_cert, &self.tls_key]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                return Err(ConnectError::Creds {
                    path: path.clone(),
                    message: "no such file".into(),
                });
            }
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            opts = opts
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .server
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e: std::io::Error| ConnectError::Connect {
                url: self.server.clone(),
                message: e.to_string(),
                transient: false,
            })?;
        opts.connect(urls).await.map_err(|e| {
            use async_nats::ConnectErrorKind as Kind;
            ConnectError::Connect {
                url: self.server.clone(),
                message: e.to_string(),
                transient: matches!(
                    e.kind(),
                    Kind::TimedOut | Kind::Io | Kind::Dns | Kind::MaxReconnects
                ),
            }
        })
    }
}

/// Resolves once `client` has connected again since it had connected
/// `since` times (`client.statistics().connects`, read before the work it
/// guards). Requests sent on a connection that was lost are never answered
/// (their replies went to it), so work waiting on them would wait out each
/// one's time-out (10 s): work that may be dropped and started again races
/// this instead. Looked at five times a second.
pub async fn reconnected(client: &async_nats::Client, since: u64) {
    let stats = client.statistics();
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if stats.connects.load(std::sync::atomic::Ordering::Relaxed) > since {
            return;
        }
    }
}

/// How many times `client` has connected so far (for [`reconnected`]).
pub fn connects(client: &async_nats::Client) -> u64 {
    client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn the_identity_comes_from_the_user_the_creds_or_the_nkey() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = ConnectArgs::url("nats://127.0.0.1:4222");
        assert_eq!(args.identity(), None);

        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"name": "worker-eu", "sub": "UABC"}"#);
        let creds = dir.path().join("w.creds");
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.{claims}.sig\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUAXXX\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        args.creds = Some(creds);
        assert_eq!(args.identity().as_deref(), Some("worker-eu"));

        let key = nkeys::KeyPair::new_user();
        let seed = dir.path().join("w.nk");
        std::fs::write(&seed, key.seed().unwrap()).unwrap();
        args.creds = None;
        args.nkey = Some(seed);
        assert_eq!(args.identity(), Some(key.public_key()));

        args.user = Some("worker".into());
        assert_eq!(args.identity().as_deref(), Some("worker"), "--user first");
    }
}
