//! The other ways to authenticate, against real nats-servers: an NKey seed
//! file, and mutual TLS with certificates made for the test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanjet::nats::server::{find, free_port};

/// A nats-server from an inline config (the store goes in `dir`).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path, port: u16, body: &str) -> Server {
    let conf = dir.join("server.conf");
    let text = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{body}\n",
        dir.join("js").display().to_string()
    );
    std::fs::write(&conf, text).unwrap();
    let nats = find().unwrap_or_else(|e| panic!("this test needs a real nats-server: {e}"));
    let child = Command::new(nats)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(child)
}

/// `fanjet workflow list` with these flags: does it get in?
fn workflow_list(url: &str, flags: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fanjet"))
        .args(["--server", url])
        .args(flags)
        .args(["workflow", "list"])
        .env("FANJET_LOG", "warn")
        .env_remove("NATS_URL")
        .output()
        .unwrap()
}

#[test]
fn an_nkey_seed_file_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let port = free_port();
    let _server = start(
        dir.path(),
        port,
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        ),
    );
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let ok = workflow_list(&url, &["--nkey", seed.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = workflow_list(&url, &[]);
    assert!(!refused.status.success(), "no credentials, no entry");
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    assert!(
        !workflow_list(&url, &["--nkey", other.to_str().unwrap()])
            .status
            .success(),
        "an unknown key is refused"
    );
    std::fs::write(&other, "not a seed").unwrap();
    let bad = workflow_list(&url, &["--nkey", other.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("NKey seed"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn mutual_tls_authenticates() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["fanjet-client".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    let ca_pem = write("ca.pem", ca.pem());
    let server_pem = write("server.pem", server.pem());
    let server_key_pem = write("server-key.pem", server_key.serialize_pem());
    let client_pem = write("client.pem", client.pem());
    let client_key_pem = write("client-key.pem", client_key.serialize_pem());
    let port = free_port();
    let _server = start(
        dir.path(),
        port,
        &format!(
            "tls {{ cert_file: {:?}\n key_file: {:?}\n ca_file: {:?}\n verify: true }}",
            server_pem.display().to_string(),
            server_key_pem.display().to_string(),
            ca_pem.display().to_string()
        ),
    );
    let url = format!("tls://127.0.0.1:{port}");
    let flags = [
        "--tls-ca",
        ca_pem.to_str().unwrap(),
        "--tls-cert",
        client_pem.to_str().unwrap(),
        "--tls-key",
        client_key_pem.to_str().unwrap(),
    ];
    let ok = workflow_list(&url, &flags);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let no_client_cert = workflow_list(&url, &["--tls-ca", ca_pem.to_str().unwrap()]);
    assert!(
        !no_client_cert.status.success(),
        "the server verifies client certificates"
    );
    let missing = workflow_list(&url, &["--tls-ca", "/no/such/ca.pem"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no such file"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
