//! Shared harness for the integration tests: a real nats-server per test on
//! a free loopback port with a temporary store (killed and removed on drop),
//! the manager and workers in-process or as `fanjet` child processes.
//!
//! A missing nats-server fails the test with the install command; it never
//! skips.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fanjet::manager::{self, ManagerOptions};
use fanjet::nats::server::NatsServer;
use fanjet::nats::store;
use fanjet::nats::Nats;
use fanjet::protocol::Job;
use fanjet::protocol::Workflow;
use fanjet::protocol::{encode_json, submit_subject, SubmitReply};
use fanjet::worker::Worker;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub server: NatsServer,
    pub nats: Nats,
    pub cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    children: Vec<Child>,
}

impl Env {
    /// Starts a fresh nats-server and connects to it.
    pub async fn start() -> Env {
        let server = match tokio::task::spawn_blocking(|| NatsServer::start(None, None))
            .await
            .expect("join")
        {
            Ok(s) => s,
            Err(e) => panic!("this test needs a real nats-server: {e}"),
        };
        let client = async_nats::connect(server.url())
            .await
            .expect("connect to the test nats-server");
        let nats = Nats::ensure(client)
            .await
            .expect("create streams and buckets");
        Env {
            server,
            nats,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn apply(&self, toml: &str) -> Workflow {
        let wf = Workflow::from_toml(toml).expect("valid workflow");
        self.nats.apply_workflow(&wf).await.expect("apply workflow");
        wf
    }

    /// Runs a manager in this process until the env is dropped.
    pub fn manager(&mut self) {
        self.manager_with(ManagerOptions {
            tick: Duration::from_millis(200),
            ..Default::default()
        });
    }

    /// Runs a manager with these options.
    pub fn manager_with(&mut self, opts: ManagerOptions) {
        let (nats, cancel) = (self.nats.clone(), self.cancel.clone());
        self.tasks.push(tokio::spawn(async move {
            manager::run(nats, opts, cancel).await.expect("manager");
        }));
    }

    /// Runs a worker pool in this process.
    pub fn worker(&mut self, worker: Worker) -> CancellationToken {
        let cancel = self.cancel.child_token();
        let c = cancel.clone();
        self.tasks.push(tokio::spawn(async move {
            worker.run(c).await.expect("worker");
        }));
        cancel
    }

    /// Puts workflow `name` straight into the bucket (not through
    /// `fanjet workflow apply`): well-formed JSON, but its one step is
    /// named `a.b`, which is no subject token.
    pub async fn put_dotted_workflow(&self, name: &str) {
        let mut def = serde_json::to_value(
            fanjet::protocol::Workflow::from_toml(&format!(
                "name = \"{name}\"\n[[steps]]\nname = \"ab\"\nkind = \"task\"\n"
            ))
            .expect("valid"),
        )
        .expect("json");
        def["steps"][0]["name"] = serde_json::json!("a.b");
        self.nats
            .workflows
            .put(name, serde_json::to_vec(&def).expect("json").into())
            .await
            .expect("put");
    }

    /// Applies workflow `name`, one fanout step `send` (`extra`: more TOML
    /// lines for it), served by an in-process worker of `slots` slots whose
    /// handler waits `each` and returns its item.
    pub async fn one_fanout(&mut self, name: &str, extra: &str, slots: usize, each: Duration) {
        self.apply(&format!(
            "name = \"{name}\"\n[[steps]]\nname = \"send\"\nkind = \"fanout\"\n{extra}\n"
        ))
        .await;
        let worker = Worker::new(self.nats.clone()).concurrency(slots).handler(
            name,
            "send",
            move |c: fanjet::worker::TaskContext| async move {
                tokio::time::sleep(each).await;
                Ok(c.task.item)
            },
        );
        self.worker(worker);
    }

    /// Runs `fanjet serve` parts (API, statistics, notifier, collector) in
    /// this process on a free port; returns the base URL and a token that
    /// stops them.
    pub async fn serve(
        &mut self,
        webhooks: fanjet::observe::notify::Webhooks,
    ) -> (String, CancellationToken) {
        let port = fanjet::nats::server::free_port();
        let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        self.serve_with(fanjet::observe::ServeOptions {
            listen,
            webhooks,
            tokens: Default::default(),
            metrics_listen: None,
        })
        .await
    }

    /// Runs `fanjet serve` parts with these options.
    pub async fn serve_with(
        &mut self,
        options: fanjet::observe::ServeOptions,
    ) -> (String, CancellationToken) {
        let listen = options.listen;
        let cancel = self.cancel.child_token();
        let (nats, c) = (self.nats.clone(), cancel.clone());
        self.tasks.push(tokio::spawn(async move {
            fanjet::observe::serve(nats, options, c)
                .await
                .expect("serve");
        }));
        let start = Instant::now();
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "fanjet serve never listened on {listen}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (format!("http://{listen}"), cancel)
    }

    /// Starts `fanjet ARGS --server URL` as a child process.
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        let child = fanjet_command(&self.url(), args)
            .spawn()
            .expect("start fanjet");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts `fanjet ARGS` with its log (warnings and errors) written to
    /// `log`, for the test to read.
    pub fn spawn_logged(&mut self, args: &[&str], log: &std::path::Path) -> usize {
        let file = std::fs::File::create(log).expect("create log file");
        let child = fanjet_command(&self.url(), args)
            .env("FANJET_LOG", "info")
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start fanjet");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Sends signal `sig` ("STOP", "CONT", "TERM") to a child started with
    /// [`spawn`](Self::spawn).
    pub fn signal(&self, i: usize, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.children[i].id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig}");
    }

    /// SIGKILLs a child started with [`spawn`](Self::spawn).
    pub fn kill(&mut self, i: usize) {
        let c = &mut self.children[i];
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Sends a submission request like any NATS client would.
    /// The token of a subjob, as its task carries it: what a test that
    /// reports outcomes itself must copy in.
    pub fn token(&self, job_id: &str, step_index: usize, index: u64) -> String {
        self.nats
            .task_key
            .as_ref()
            .expect("the test's connection reads the task token key")
            .token(job_id, step_index, index, 0)
    }

    pub async fn submit(&self, workflow: &str, body: Value) -> SubmitReply {
        submit_bytes(
            &self.nats,
            workflow,
            encode_json(&body).expect("json").to_vec(),
        )
        .await
    }

    /// Waits until the job has ended; fails the test after `within`.
    pub async fn wait_end(&self, job_id: &str, within: Duration) -> Job {
        let start = Instant::now();
        loop {
            if let Some((job, _)) = store::get(&self.nats, job_id).await.expect("read status") {
                if job.state.is_terminal() {
                    return job;
                }
                if start.elapsed() > within {
                    panic!(
                        "job {job_id} did not end within {within:?}: {}",
                        serde_json::to_string_pretty(&job).unwrap_or_default()
                    );
                }
            } else if start.elapsed() > within {
                panic!("job {job_id} never appeared within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job's statistics (kept by `serve`) satisfy `f`.
    pub async fn wait_stats(
        &self,
        job_id: &str,
        within: Duration,
        f: impl Fn(&fanjet::protocol::JobStats) -> bool,
    ) -> fanjet::protocol::JobStats {
        let start = Instant::now();
        loop {
            let stats = store::stats(&self.nats, job_id)
                .await
                .expect("read statistics");
            match stats {
                Some(s) if f(&s) => return s,
                s => assert!(
                    start.elapsed() < within,
                    "job {job_id}: statistics not as expected within {within:?}: {s:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `f(job)` holds.
    pub async fn wait_for(
        &self,
        job_id: &str,
        within: Duration,
        what: &str,
        f: impl Fn(&Job) -> bool,
    ) -> Job {
        let start = Instant::now();
        loop {
            if let Some((job, _)) = store::get(&self.nats, job_id).await.expect("read status") {
                if f(&job) {
                    return job;
                }
            }
            assert!(
                start.elapsed() < within,
                "job {job_id}: {what} did not happen within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The job's events in the log, as JSON, in order.
    pub async fn events(&self, job_id: &str) -> Vec<Value> {
        use futures::StreamExt;
        let consumer = self
            .nats
            .log(job_id)
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: fanjet::protocol::job_events_filter(job_id),
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut out = Vec::new();
        let mut msgs = consumer.messages().await.expect("messages");
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
        {
            out.push(serde_json::from_slice(&m.payload).expect("event json"));
            if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
                break;
            }
        }
        out
    }

    /// Messages left in the task stream for `filter`.
    pub async fn queued_tasks(&self, filter: &str) -> u64 {
        use futures::StreamExt;
        let mut n = 0;
        for queue in &self.nats.tasks {
            let mut subjects = queue
                .clone()
                .info_with_subjects(filter)
                .await
                .expect("stream info");
            while let Some(entry) = subjects.next().await {
                n += entry.expect("subject count").1 as u64;
            }
        }
        n
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn submit_bytes(nats: &Nats, workflow: &str, body: Vec<u8>) -> SubmitReply {
    let start = Instant::now();
    loop {
        match nats
            .client
            .request(submit_subject(workflow), body.clone().into())
            .await
        {
            Ok(m) => return serde_json::from_slice(&m.payload).expect("reply json"),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("submission got no answer: {e}"),
        }
    }
}

/// `fanjet ARGS` pointed at `url`, with quiet logs.
/// The completions among `events` (log events as JSON), each as the
/// `SubjobCompleted` it would be alone: those a worker reported together (a
/// `SubjobsCompleted`) are taken apart.
pub fn completions(events: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for e in events {
        match e["type"].as_str() {
            Some("SubjobCompleted") => out.push(e.clone()),
            Some("SubjobsCompleted") => {
                for o in e["outcomes"].as_array().into_iter().flatten() {
                    let mut one = o.clone();
                    one["type"] = "SubjobCompleted".into();
                    one["job_id"] = e["job_id"].clone();
                    one["step_index"] = e["step_index"].clone();
                    if let Some(run) = e.get("run") {
                        one["run"] = run.clone();
                    }
                    if one.get("result").is_none() {
                        one["result"] = Value::Null;
                    }
                    out.push(one);
                }
            }
            _ => {}
        }
    }
    out
}

pub fn fanjet_command(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fanjet"));
    c.args(args)
        .env("NATS_URL", url)
        .env("FANJET_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    c
}

/// The seed shape with a configurable fanout step.
pub fn seed_workflow(name: &str, fanout_extra: &str) -> String {
    format!(
        r#"
name = "{name}"
[[steps]]
name = "collect"
kind = "task"
timeout = "5s"
[[steps]]
name = "send"
kind = "fanout"
timeout = "5s"
max_attempts = 3
backoff = ["50ms"]
{fanout_extra}
[[steps]]
name = "summarize"
kind = "task"
timeout = "5s"
"#
    )
}

/// Runs `fanjet ARGS` against `env` as a user would: whether it succeeded,
/// and its stdout then stderr.
pub fn cli(env: &Env, args: &[&str]) -> (bool, String) {
    let out = fanjet_command(&env.url(), args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run fanjet");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
