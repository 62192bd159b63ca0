//! The `fanjet` binary as a user runs it: workflow apply/list, worker
//! --exec, submit --wait, status --json, jobs, errors, a plain NATS publish,
//! and the embedded `dev --demo`.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{fanjet_command, Env};
use serde_json::{json, Value};

fn run(env: &Env, args: &[&str]) -> Output {
    fanjet_command(&env.url(), args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run fanjet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_job_end_to_end() {
    let mut env = Env::start().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let applied = run(
        &env,
        &[
            "workflow",
            "apply",
            &format!("{root}/examples/squares.toml"),
        ],
    );
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(stdout(&applied).contains("applied squares (2 steps)"));
    let list = run(&env, &["workflow", "list"]);
    assert!(
        stdout(&list).contains("square(fanout) -> report(task)"),
        "{}",
        stdout(&list)
    );

    env.spawn(&["manager"]);
    env.spawn(&[
        "worker",
        "--workflow",
        "squares",
        "--step",
        "square",
        "--step",
        "report",
        "--concurrency",
        "4",
        "--exec",
        "echo $((FANJET_INDEX * FANJET_INDEX))",
    ]);

    let out = run(
        &env,
        &[
            "submit",
            "squares",
            "--job-id",
            "sq-1",
            "--customer",
            "acme",
            "--input",
            "[5, 6, 7, 8]",
            "--wait",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let job: Value =
        serde_json::from_str(&stdout(&out)).expect("submit --wait --json prints the job");
    assert_eq!(job["state"], "completed");
    // Submitted as acme, on its tenant subject: the id is in acme's namespace.
    let id = fanjet::protocol::tenant_job_id("acme", "sq-1");
    assert_eq!(job["job_id"], json!(id));

    let status = run(&env, &["status", &id, "--json"]);
    assert!(status.status.success());
    let s: Value = serde_json::from_str(&stdout(&status)).unwrap();
    for key in ["job_id", "workflow", "customer", "state", "steps"] {
        assert!(s.get(key).is_some(), "status lacks {key}");
    }
    assert_eq!(
        (
            s["job_id"].as_str(),
            s["workflow"].as_str(),
            s["customer"].as_str()
        ),
        (Some(id.as_str()), Some("squares"), Some("acme"))
    );
    let step = &s["steps"][0];
    for key in [
        "name",
        "kind",
        "state",
        "total",
        "completed",
        "failed",
        "retries",
        "started_at",
        "finished_at",
    ] {
        assert!(step.get(key).is_some(), "step lacks {key}");
    }
    assert_eq!(
        (step["total"].as_u64(), step["completed"].as_u64()),
        (Some(4), Some(4))
    );
    // The report step got the fanout's summary; its stdout (its index squared, 0) is the output.
    assert_eq!(s["output"], json!(0));

    // A reader that goes away (`fanjet status X | head -0`) ends the
    // command quietly, as with any Unix tool: no panic.
    let mut piped = fanjet_command(&env.url(), &["status", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fanjet");
    drop(piped.stdout.take());
    let closed = piped.wait_with_output().expect("fanjet ends");
    assert!(
        !stderr(&closed).contains("panicked") && closed.status.code() != Some(101),
        "{:?}: {}",
        closed.status,
        stderr(&closed)
    );

    let human = run(&env, &["status", &id]);
    assert!(
        stdout(&human).contains("state completed"),
        "{}",
        stdout(&human)
    );

    // The job index has it (kept by the manager, a moment after the end).
    let mut listed = Value::Null;
    for _ in 0..50 {
        let jobs = run(&env, &["jobs", "--customer", "acme", "--json"]);
        listed = serde_json::from_str(&stdout(&jobs)).unwrap();
        if listed["jobs"].as_array().map(|a| a.len()) == Some(1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(listed["jobs"][0]["state"], "completed", "{listed}");
    let none = run(&env, &["jobs", "--customer", "other", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&none)).unwrap(),
        json!({"jobs": []})
    );

    // A plain publish, no reply subject: fire and forget, still a job.
    env.nats
        .client
        .publish(
            "fanjet.submit.squares",
            r#"{"job_id": "plain-1", "input": [1, 2]}"#.into(),
        )
        .await
        .unwrap();
    let job = env.wait_end("plain-1", Duration::from_secs(20)).await;
    assert_eq!(job.state, fanjet::protocol::JobState::Completed);

    // Errors are clear and exit non-zero.
    let unknown = run(&env, &["submit", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown workflow"),
        "{}",
        stderr(&unknown)
    );
    let missing = run(&env, &["status", "no-such-job"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no job"), "{}", stderr(&missing));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"w\"\n[[steps]]\nname = \"a\"\nkind = \"task\"\ntimeout = \"soonish\"\n",
    )
    .unwrap();
    let rejected = run(&env, &["workflow", "apply", bad.to_str().unwrap()]);
    assert!(!rejected.status.success());
    assert!(
        stderr(&rejected).contains("timeout"),
        "{}",
        stderr(&rejected)
    );
    let bad_input = run(&env, &["submit", "squares", "--input", "{oops"]);
    assert!(
        stderr(&bad_input).contains("not valid JSON"),
        "{}",
        stderr(&bad_input)
    );
}

#[test]
fn dev_demo_runs_the_seed_job_on_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nats");
    let port = fanjet::nats::server::free_port().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanjet"))
        .args([
            "dev",
            "--demo",
            "--invoices",
            "200",
            "--store",
            store.to_str().unwrap(),
            "--port",
            &port,
        ])
        .env("FANJET_LOG", "warn")
        .output()
        .expect("run fanjet dev");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("state completed"), "{text}");
    assert!(text.contains("\"invoices_sent\":200"), "{text}");
    assert!(
        text.contains("\"results_read\":200"),
        "S3 read every result back from the log: {text}"
    );
    assert!(
        text.contains("statistics") && text.contains("p50 ms"),
        "final statistics: {text}"
    );
}

#[test]
fn help_explains_the_commands() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanjet"))
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Exit 100"), "{text}");
    assert!(text.contains("--concurrency"));
    assert!(text.contains("--threads"));
    let zero = std::process::Command::new(env!("CARGO_BIN_EXE_fanjet"))
        .args([
            "worker",
            "--workflow",
            "w",
            "--step",
            "s",
            "--sleep",
            "0ms",
            "--threads",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!zero.status.success());
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("--threads"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exits_with_the_jobs_outcome() {
    let mut env = Env::start().await;
    env.apply("name = \"w\"\n[[steps]]\nname = \"s\"\nkind = \"fanout\"\ntimeout = \"5s\"\nmax_attempts = 1\n").await;
    env.spawn(&["manager"]);
    env.spawn(&[
        "worker",
        "--workflow",
        "w",
        "--step",
        "s",
        "--exec",
        "test \"$FANJET_INDEX\" != 9 || exit 100; sleep 0.05",
    ]);
    let ok = env
        .submit("w", json!({"job_id": "ok-1", "input": [1, 2, 3]}))
        .await;
    let bad = env
        .submit(
            "w",
            json!({"job_id": "bad-1", "input": (0..12).collect::<Vec<_>>()}),
        )
        .await;
    assert!(ok.ok && bad.ok);
    let watched = run(&env, &["watch", "ok-1"]);
    assert_eq!(watched.status.code(), Some(0), "{}", stderr(&watched));
    assert!(stdout(&watched).contains("state completed"));
    let failed = run(&env, &["watch", "bad-1"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stdout(&failed));
    assert!(stdout(&failed).contains("state failed"));
    let missing = run(&env, &["watch", "nope"]);
    assert!(!missing.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_started_before_their_server_wait_for_it() {
    let port = fanjet::nats::server::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    // A manager and `fanjet serve` started first, as a supervisor may do
    // while the server (or a cluster's leader) is not up yet.
    let spawn = |args: &[&str]| {
        fanjet_command(&url, args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fanjet starts")
    };
    let mut manager = spawn(&["manager"]);
    let api = fanjet::nats::server::free_port();
    let mut serve = spawn(&["serve", "--listen", &format!("127.0.0.1:{api}")]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(manager.try_wait().unwrap().is_none(), "the manager waits");
    assert!(serve.try_wait().unwrap().is_none(), "serve waits");

    let server = tokio::task::spawn_blocking(move || {
        fanjet::nats::server::NatsServer::start(None, Some(port))
    })
    .await
    .unwrap()
    .expect("this test needs a real nats-server");
    let client = async_nats::connect(server.url()).await.unwrap();
    let nats = fanjet::nats::Nats::ensure(client).await.unwrap();
    nats.apply_workflow(
        &fanjet::protocol::Workflow::from_toml(
            "name = \"late\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\n",
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let worker = fanjet::worker::Worker::new(nats.clone()).handler(
        "late",
        "send",
        |c: fanjet::worker::TaskContext| async move { Ok(c.task.item) },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(worker.run(stop));
    // The manager came up once the server did: it answers and runs a job.
    let sub = fanjet::protocol::Submission {
        job_id: Some("late-1".into()),
        customer: None,
        input: json!([1, 2, 3]),
        priority: None,
    };
    let reply = fanjet::client::submit(&nats.client, "late", &sub)
        .await
        .expect("a manager answers");
    assert!(reply.ok, "{reply:?}");
    let start = std::time::Instant::now();
    loop {
        let job = fanjet::nats::store::get(&nats, "late-1").await.unwrap();
        if job.is_some_and(|(j, _)| j.state == fanjet::protocol::JobState::Completed) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the job did not complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // So did serve.
    let health = reqwest::get(format!("http://127.0.0.1:{api}/healthz")).await;
    assert!(
        health.is_ok_and(|r| r.status().is_success()),
        "serve answers"
    );
    for child in [&mut manager, &mut serve] {
        let pid = child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = tokio::task::block_in_place(|| child.wait()).unwrap();
        assert!(status.success(), "one SIGTERM stops it cleanly: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sigterm_stops_services_whose_server_is_gone() {
    let mut server =
        tokio::task::spawn_blocking(|| fanjet::nats::server::NatsServer::start(None, None))
            .await
            .unwrap()
            .expect("this test needs a real nats-server");
    let url = server.url();
    let spawn = |args: &[&str]| {
        fanjet_command(&url, args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fanjet starts")
    };
    let api = fanjet::nats::server::free_port();
    let mut children = vec![
        ("manager", spawn(&["manager", "--grace", "1s"])),
        (
            "serve",
            spawn(&[
                "serve",
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--grace",
                "1s",
            ]),
        ),
        (
            "worker",
            spawn(&[
                "worker",
                "--workflow",
                "w",
                "--step",
                "s",
                "--sleep",
                "10ms",
                "--grace",
                "1s",
            ]),
        ),
    ];
    let up = std::time::Instant::now();
    while !reqwest::get(format!("http://127.0.0.1:{api}/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "serve did not come up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // NATS goes away; each process gets one SIGTERM.
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (_, child) in &children {
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
    // Stopping may wait on NATS; the grace period (1 s, a worker's plus 5 s
    // to report) bounds it, where serve used to take some 18 s.
    let asked = std::time::Instant::now();
    for (name, child) in &mut children {
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if asked.elapsed() > Duration::from_secs(12) {
                let _ = child.kill();
                panic!("{name} still runs 12 s after one SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[test]
fn log_lines_are_plain_text_when_stderr_is_not_a_terminal() {
    use std::io::Read;
    // Nothing listens on this port: the manager logs that it waits.
    let url = format!("nats://127.0.0.1:{}", fanjet::nats::server::free_port());
    let mut manager = fanjet_command(&url, &["manager"])
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fanjet starts");
    std::thread::sleep(Duration::from_millis(800));
    let _ = manager.kill();
    let _ = manager.wait();
    let mut log = String::new();
    manager
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut log)
        .expect("readable log");
    assert!(
        log.contains("waiting for NATS"),
        "the manager logged: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes in a piped log: {log:?}"
    );
}
