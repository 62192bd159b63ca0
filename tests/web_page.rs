//! The web page in headless Chromium (Debian packages `chromium` and
//! `chromium-driver`), driven over WebDriver during a running job: the job
//! shows in the list, its progress grows live, it ends completed. A
//! screenshot is saved to `target/screenshots/web-page.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{seed_workflow, Env};
use fanjet::observe::notify::Webhooks;
use fanjet::worker::{TaskContext, Worker};
use serde_json::{json, Value};

fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or(None)
}

struct Driver {
    child: Child,
    url: String,
    session: Option<String>,
    http: reqwest::Client,
    /// Chromium's profile folder, unique to this driver: every Chromium
    /// process it starts names it on its command line.
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Killing chromedriver alone leaves Chromium running (it is
        // re-parented); stop every process of this profile first.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", "--"])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(profile: &Path) -> Driver {
        let driver = find("chromedriver").unwrap_or_else(|| panic!("this test needs chromedriver: `apt-get install chromium chromium-driver` (`just test` does it for you)"));
        let chromium = find("chromium").unwrap_or_else(|| panic!("this test needs chromium: `apt-get install chromium chromium-driver` (`just test` does it for you)"));
        let port = fanjet::nats::server::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            session: None,
            http: reqwest::Client::new(),
            profile: profile.to_path_buf(),
        };
        let start = Instant::now();
        while d
            .http
            .get(format!("{}/status", d.url))
            .send()
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,900", format!("--user-data-dir={}", profile.display())]
        }}}});
        let r: Value = d
            .http
            .post(format!("{}/session", d.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        d.session = Some(id);
        d
    }

    fn at(&self, path: &str) -> String {
        format!(
            "{}/session/{}{path}",
            self.url,
            self.session.as_deref().unwrap_or("")
        )
    }

    async fn go(&self, url: &str) {
        let r: Value = self
            .http
            .post(self.at("/url"))
            .json(&json!({"url": url}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(r["value"].is_null(), "navigation failed: {r}");
    }

    async fn js(&self, script: &str) -> Value {
        let r: Value = self
            .http
            .post(self.at("/execute/sync"))
            .json(&json!({"script": script, "args": []}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["value"].clone()
    }

    async fn screenshot(&self, to: &Path) {
        let r: Value = self
            .http
            .get(self.at("/screenshot"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["value"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
    }
}

/// Completed subjobs of `step` as the page shows them, if shown.
const DONE: &str = "const e = document.querySelector('.step[data-step=\"send\"] .done'); return e ? Number(e.textContent) : null;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_running_job_live_in_chromium() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("page", "")).await;
    env.manager();
    let (base, _stop) = env.serve(Webhooks::default()).await;
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(4)
            .handler("page", "collect", |_c: TaskContext| async move {
                Ok(Value::Array((0..400).map(|i| json!(i)).collect()))
            })
            .handler("page", "send", |c: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                // Job web-2's subjob 5 fails in its first run only.
                if c.task.job_id == "web-2" && c.task.index == 5 && c.task.run == 0 {
                    return Err(fanjet::worker::TaskError::give_up("mail server down"));
                }
                Ok(c.task.item)
            })
            .handler("page", "summarize", |c: TaskContext| async move {
                Ok(c.task.input)
            }),
    );
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path()).await;
    assert!(
        env.submit("page", json!({"job_id": "web-1", "customer": "acme"}))
            .await
            .ok
    );
    env.wait_for("web-1", Duration::from_secs(20), "send started", |j| {
        j.steps[1].completed > 0
    })
    .await;

    driver.go(&format!("{base}/#job=web-1")).await;
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 3 && start.elapsed() < Duration::from_secs(20) {
        if let Some(n) = driver.js(DONE).await.as_u64() {
            if seen.last() != Some(&n) && n < 400 {
                seen.push(n);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen.len() >= 3 && seen.windows(2).all(|w| w[0] < w[1]),
        "progress grew live on the page: {seen:?}"
    );
    let listed = driver
        .js("return !!document.querySelector('tr.job[data-id=\"web-1\"]');")
        .await;
    assert_eq!(listed, json!(true), "the job is in the jobs list");
    let counts = driver
        .js("const e = document.querySelector('#counts'); return e ? e.textContent : null;")
        .await;
    assert!(
        counts
            .as_str()
            .is_some_and(|c| c.contains("job(s):") && c.contains(" running")),
        "the page counts the jobs per state: {counts}"
    );
    // A search by id prefix: another prefix lists nothing.
    let none = driver
        .js("document.querySelector('#filters [name=prefix]').value = 'zz'; document.querySelector('#filters button').click(); return true;")
        .await;
    assert_eq!(none, json!(true));
    let start = Instant::now();
    loop {
        let empty = driver
            .js("return !document.querySelector('tr.job') && document.querySelector('#jobs').textContent.includes('no jobs');")
            .await;
        if empty == json!(true) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the prefix search did not empty the list"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    driver
        .js("document.querySelector('#filters [name=prefix]').value = 'web-'; document.querySelector('#filters button').click(); return true;")
        .await;
    let procs = driver
        .js("const e = document.querySelector('#processes'); return e ? e.textContent : null;")
        .await;
    assert!(
        procs.as_str().unwrap_or("").contains("partitions 0-15"),
        "the page shows the manager and its partitions: {procs}"
    );
    let customers = driver
        .js("const e = document.querySelector('#customers'); return e ? e.textContent : null;")
        .await;
    let customers = customers.as_str().unwrap_or("");
    assert!(
        customers.contains("no fanout running") || customers.contains("running"),
        "the page shows the customers' use of the workers: {customers}"
    );
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots/web-page.png");
    driver.screenshot(&shot).await;

    env.wait_end("web-1", Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let state = driver.js("const e = document.querySelector('#title .state'); return e ? e.textContent : null;").await;
        if state == json!("completed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the page never showed the end: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(driver.js(DONE).await, json!(400));
    // The timeline is fetched after each step or job transition.
    let start = Instant::now();
    loop {
        let timeline = driver
            .js("return document.querySelector('#timeline').textContent;")
            .await;
        let text = timeline.as_str().unwrap_or("");
        if text.contains("step send started with 400") && text.contains("job completed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the timeline never showed the job's steps and end: {timeline}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    driver
        .screenshot(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots/web-page-done.png"),
        )
        .await;

    // A failed job is redriven from the page.
    assert!(env.submit("page", json!({"job_id": "web-2"})).await.ok);
    let failed = env.wait_end("web-2", Duration::from_secs(30)).await;
    assert_eq!(failed.state, fanjet::protocol::JobState::Failed);
    driver.go(&format!("{base}/#job=web-2")).await;
    let start = Instant::now();
    while driver
        .js("return !!document.querySelector('#redrive');")
        .await
        != json!(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no redrive button on a failed job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    driver
        .js("document.querySelector('#redrive').click(); return true;")
        .await;
    let start = Instant::now();
    loop {
        let state = driver.js("const e = document.querySelector('#title .state'); return e ? e.textContent : null;").await;
        let timeline = driver
            .js("return document.querySelector('#timeline').textContent;")
            .await;
        if state == json!("completed")
            && timeline
                .as_str()
                .unwrap_or("")
                .contains("job redriven (run 1)")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the page never showed the redriven job's end: {state} {timeline}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs = driver
        .js("return document.querySelector('#job').textContent;")
        .await;
    assert!(
        runs.as_str()
            .unwrap_or("")
            .contains("run 0 had ended failed"),
        "the first run's figures stay on the page: {runs}"
    );
}
