//! The Grafana dashboard against a real Prometheus (Debian package
//! `prometheus`): Prometheus scrapes a running fanjet during a job, then
//! every PromQL expression in `dashboards/*.json` must return data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{seed_workflow, Env};
use fanjet::observe::notify::Webhooks;
use fanjet::worker::{TaskContext, TaskError, Worker};
use serde_json::{json, Value};

fn prometheus_binary() -> PathBuf {
    for p in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if p.join("prometheus").is_file() {
            return p.join("prometheus");
        }
    }
    panic!("this test needs Prometheus: install it with `apt-get install prometheus` (`just test` does it for you)");
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every `expr` of every panel target in the dashboards folder, with its file and panel.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let where_ = format!(
                    "{} / {}",
                    path.file_name().unwrap().to_string_lossy(),
                    panel["title"].as_str().unwrap()
                );
                out.push((where_, target["expr"].as_str().unwrap().to_string()));
            }
        }
    }
    out
}

/// Grafana's template variables, as Grafana would expand them here.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$workflow", ".*")
}

async fn query(base: &str, expr: &str) -> Result<usize, String> {
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("{body}"));
    }
    Ok(body["data"]["result"].as_array().map(Vec::len).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let queries = dashboard_queries();
    assert!(
        queries.len() >= 10,
        "the dashboard has its panels: {}",
        queries.len()
    );
    let binary = prometheus_binary();

    let mut env = Env::start().await;
    env.apply(&seed_workflow("dash", "tolerate_failures = \"5\""))
        .await;
    env.manager();
    let (base, _stop) = env.serve(Webhooks::default()).await;
    env.worker(
        Worker::new(env.nats.clone())
            .concurrency(8)
            .handler("dash", "collect", |_c: TaskContext| async move {
                Ok(Value::Array((0..300).map(|i| json!(i)).collect()))
            })
            .handler("dash", "send", |c: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                match (c.task.index, c.attempt) {
                    (3, _) => Err(TaskError::give_up("no address")),
                    (i, 1) if i % 7 == 0 => Err(TaskError::retry("flaky")),
                    _ => Ok(json!(null)),
                }
            })
            .handler("dash", "summarize", |c: TaskContext| async move {
                Ok(c.task.input)
            }),
    );

    let dir = tempfile::tempdir().unwrap();
    let target = base.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: fanjet\n    static_configs:\n      - targets: [\"{target}\"]\n"),
    )
    .unwrap();
    let port = fanjet::nats::server::free_port();
    let prom = Command::new(&binary)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let _prom = Prometheus(prom);
    let prom_url = format!("http://127.0.0.1:{port}");

    // Scraping while the job runs, and for a few seconds after.
    assert!(env.submit("dash", json!({"job_id": "d-1"})).await.ok);
    let job = env.wait_end("d-1", Duration::from_secs(60)).await;
    assert_eq!(
        job.state,
        fanjet::protocol::JobState::Completed,
        "{:?}",
        job.error
    );

    let start = Instant::now();
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for (where_, expr) in &queries {
            match query(&prom_url, &expand(expr)).await {
                Ok(n) if n > 0 => {}
                Ok(_) => missing.push(format!("{where_}: no series for {expr}")),
                Err(e) => missing.push(format!("{where_}: {expr}: {e}")),
            }
        }
        if missing.is_empty() || start.elapsed() > Duration::from_secs(45) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        missing.is_empty(),
        "dashboard queries without data:\n{}",
        missing.join("\n")
    );
    // And the numbers are the job's: 299 sends succeeded, one failed.
    assert_eq!(
        query(
            &prom_url,
            "fanjet_subjobs_completed_total{workflow=\"dash\",step=\"send\"} == 299"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        query(
            &prom_url,
            "fanjet_subjobs_failed_total{workflow=\"dash\",step=\"send\"} == 1"
        )
        .await,
        Ok(1)
    );
}
