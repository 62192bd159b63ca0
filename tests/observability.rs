//! Seeing everything, against a real nats-server: the HTTP API (status with
//! statistics and ETA, events, live SSE, submit, cancel, errors), the
//! OpenAPI document, notifications on NATS and webhooks, and `/metrics`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{seed_workflow, Env};
use fanjet::observe::notify::Webhooks;
use fanjet::worker::{TaskContext, TaskError, Worker};
use futures::StreamExt;
use serde_json::{json, Value};

fn seed_worker(env: &Env, wf: &str, delay_ms: u64) -> Worker {
    Worker::new(env.nats.clone())
        .concurrency(16)
        .handler(wf, "collect", |ctx: TaskContext| async move {
            let n = ctx.task.input["count"].as_u64().unwrap_or(0);
            Ok(Value::Array((0..n).map(|i| json!(i)).collect()))
        })
        .handler(wf, "send", move |ctx: TaskContext| async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            match (ctx.task.index, ctx.attempt) {
                (i, 1) if i % 10 == 0 => Err(TaskError::retry("flaky")),
                (7, _) => Err(TaskError::give_up("bad address")),
                _ => Ok(json!(ctx.task.index)),
            }
        })
        .handler(wf, "summarize", |ctx: TaskContext| async move {
            Ok(ctx.task.input)
        })
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_status_statistics_events_and_live_progress() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("inv", "tolerate_failures = \"5\""))
        .await;
    env.manager();
    let (base, _stop) = env.serve(Webhooks::default()).await;
    // Handlers of 30 ms: the job lasts long enough (half a second or more)
    // for the live stream to show several checkpoints; with 5 ms ones it
    // could end two updates after the stream opened.
    env.worker(seed_worker(&env, "inv", 30));

    let (code, body) = post(
        &format!("{base}/api/jobs"),
        json!({"workflow": "inv", "job_id": "api-1", "customer": "acme", "input": {"count": 200}}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["job_id"], "api-1");

    // Live progress: SSE status events until the `end` event.
    let mut sse = reqwest::get(format!("{base}/api/jobs/api-1/stream"))
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 200);
    assert!(sse.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut text = String::new();
    let mut done_counts = Vec::new();
    let mut ended = false;
    while !ended {
        let chunk = tokio::time::timeout(Duration::from_secs(30), sse.chunk())
            .await
            .expect("SSE went quiet")
            .unwrap();
        let Some(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let kind = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let data: Value = serde_json::from_str(data).unwrap();
            done_counts.push(data["steps"][1]["completed"].as_u64().unwrap_or(0));
            if kind == "end" {
                assert_eq!(data["state"], "completed");
                ended = true;
            }
        }
    }
    assert!(ended, "the stream ends with an `end` event");
    assert!(
        done_counts.len() >= 3,
        "several live updates: {done_counts:?}"
    );
    assert!(
        done_counts.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {done_counts:?}"
    );
    assert_eq!(done_counts.last(), Some(&199));

    let (code, job) = get(&format!("{base}/api/jobs/api-1")).await;
    assert_eq!(code, 200);
    assert_eq!(job["state"], "completed");
    let send = &job["steps"][1];
    assert_eq!(
        (
            send["completed"].as_u64(),
            send["failed"].as_u64(),
            send["retries"].as_u64()
        ),
        (Some(199), Some(1), Some(20))
    );
    assert_eq!(send["failures"][0]["error"], "bad address");
    assert_eq!(send["failures"][0]["index"], 7);
    // Statistics (they follow the log within a second): attempts histogram
    // and duration percentiles of the 30 ms handlers.
    let mut job = job;
    for _ in 0..50 {
        if job["steps"][1]["stats"]["attempts_histogram"]
            .as_array()
            .is_some_and(|h| h.iter().filter_map(Value::as_u64).sum::<u64>() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = get(&format!("{base}/api/jobs/api-1")).await.1;
    }
    let st = &job["steps"][1]["stats"];
    let hist: Vec<u64> = st["attempts_histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(hist[0] + hist[1], 200, "{hist:?}");
    assert_eq!(
        &hist[..2],
        &[180, 20],
        "every tenth subjob succeeded on its second attempt"
    );
    let p50 = st["subjob_duration_ms"]["p50"].as_u64().unwrap();
    let p95 = st["subjob_duration_ms"]["p95"].as_u64().unwrap();
    let max = st["subjob_duration_ms"]["max"].as_u64().unwrap();
    assert!(
        (5..=100).contains(&p50) && p50 <= p95 && p95 <= max,
        "p50 {p50} p95 {p95} max {max}"
    );
    assert!(st["throughput_per_s"].as_f64().unwrap() > 0.0);
    assert!(job.get("definition").is_none());

    // The job index has it a moment after its end.
    let mut list = Value::Null;
    for _ in 0..50 {
        let (code, l) = get(&format!(
            "{base}/api/jobs?customer=acme&state=completed&counts=true"
        ))
        .await;
        assert_eq!(code, 200);
        list = l;
        if list["counts"]["total"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(list["counts"]["total"], 1, "{list}");
    assert_eq!(list["jobs"][0]["job_id"], "api-1");
    let (_, none) = get(&format!("{base}/api/jobs?customer=other")).await;
    assert_eq!(none["jobs"], json!([]));

    let (code, ev) = get(&format!("{base}/api/jobs/api-1/events")).await;
    assert_eq!(code, 200);
    let events = ev["events"].as_array().unwrap();
    assert_eq!(events.first().unwrap()["event"]["type"], "JobRequested");
    assert_eq!(events.last().unwrap()["event"]["type"], "JobCompleted");
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()),
        "in log order"
    );

    // Errors: JSON, with the right status codes.
    assert_eq!(get(&format!("{base}/api/jobs/nope")).await.0, 404);
    let (code, err) = post(&format!("{base}/api/jobs"), json!({"workflow": "ghost"})).await;
    assert_eq!(code, 404);
    assert_eq!(err["error"]["code"], "unknown_workflow");
    let r = reqwest::Client::new()
        .post(format!("{base}/api/jobs"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "malformed_payload"
    );
    let (code, err) = post(
        &format!("{base}/api/jobs"),
        json!({"workflow": "inv", "job_id": "a.b"}),
    )
    .await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (400, Some("invalid_job_id"))
    );
    let (code, err) = post(&format!("{base}/api/jobs/api-1/cancel"), json!({})).await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (409, Some("job_ended"))
    );
    let (code, again) = post(
        &format!("{base}/api/jobs"),
        json!({"workflow": "inv", "job_id": "api-1"}),
    )
    .await;
    assert_eq!((code, again["duplicate"].as_bool()), (200, Some(true)));
    assert_eq!(get(&format!("{base}/no/such/route")).await.0, 404);
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);

    // The metrics carry what happened.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "fanjet_subjobs_completed_total{step=\"send\",workflow=\"inv\"} 199",
        "fanjet_subjobs_failed_total{step=\"send\",workflow=\"inv\"} 1",
        "fanjet_jobs_finished_total{outcome=\"completed\",workflow=\"inv\"} 1",
        // Known steps and outcomes are there at zero, not missing.
        "fanjet_subjobs_failed_total{step=\"collect\",workflow=\"inv\"} 0",
        "fanjet_jobs_finished_total{outcome=\"failed\",workflow=\"inv\"} 0",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_http_and_the_openapi_document_matches_the_routes() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("slow", "tolerate_failures = \"5\""))
        .await;
    env.manager();
    let (base, _stop) = env.serve(Webhooks::default()).await;
    env.worker(seed_worker(&env, "slow", 200));
    let (code, _) = post(
        &format!("{base}/api/jobs"),
        json!({"workflow": "slow", "job_id": "c-1", "input": {"count": 500}}),
    )
    .await;
    assert_eq!(code, 202);
    env.wait_for("c-1", Duration::from_secs(20), "send running", |j| {
        j.steps[1].completed > 0
    })
    .await;
    let (_, running) = get(&format!("{base}/api/jobs/c-1")).await;
    assert!(
        running["steps"][1]["eta_ms"].as_u64().is_some(),
        "a running fanout has an ETA: {}",
        running["steps"][1]
    );
    let (code, body) = post(
        &format!("{base}/api/jobs/c-1/cancel"),
        json!({"reason": "from the API"}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let job = env.wait_end("c-1", Duration::from_secs(10)).await;
    assert_eq!(job.state, fanjet::protocol::JobState::Cancelled);
    assert_eq!(job.error.as_deref(), Some("from the API"));

    let (code, doc) = get(&format!("{base}/api/openapi.json")).await;
    assert_eq!(code, 200);
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(fanjet::observe::api::OPENAPI).unwrap()
    );
    let paths = doc["paths"].as_object().unwrap();
    let routes = [
        ("/", "get"),
        ("/api/jobs", "get"),
        ("/api/jobs", "post"),
        ("/api/jobs/counts", "get"),
        ("/api/jobs/{id}", "get"),
        ("/api/jobs/{id}/events", "get"),
        ("/api/jobs/{id}/stream", "get"),
        ("/api/jobs/{id}/cancel", "post"),
        ("/api/jobs/{id}/pause", "post"),
        ("/api/jobs/{id}/resume", "post"),
        ("/api/jobs/{id}/update", "post"),
        ("/api/jobs/{id}/steps/{step}/results", "get"),
        ("/api/processes", "get"),
        ("/api/customers", "get"),
        ("/api/openapi.json", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ];
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes.len(),
        "every documented operation is served, and only those"
    );
    for (path, method) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in docs/openapi.json"
        );
        let url = format!(
            "{base}{}",
            path.replace("{id}", "c-1").replace("{step}", "0")
        );
        let status = match method {
            "get" if path.ends_with("/stream") => {
                reqwest::get(&url).await.unwrap().status().as_u16()
            }
            "get" => reqwest::get(&url).await.unwrap().status().as_u16(),
            _ => reqwest::Client::new()
                .post(&url)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        };
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            status != 404 || path.starts_with("/api/jobs/{id}/") && method == "post",
            "{method} {path} answered 404"
        );
    }
}

/// A webhook receiver that refuses each notification's first delivery.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<(String, Value)>>>) {
    use axum::http::{HeaderMap, StatusCode};
    let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::new(Mutex::new(Vec::new()));
    let refused: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
            let (g, refused) = (g.clone(), refused.clone());
            async move {
                let id = headers
                    .get("Fanjet-Notification-Id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if refused.lock().unwrap().insert(id.clone()) {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                g.lock().unwrap().push((id, body.0));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_and_job_notifications_reach_nats_and_webhooks_once() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("note", "tolerate_failures = \"5\""))
        .await;
    env.manager();
    let (hook, received) = webhook_receiver().await;
    let hooks = Webhooks {
        urls: vec![hook],
        attempts: 5,
        first_backoff: Duration::from_millis(100),
    };
    let (_base, stop) = env.serve(hooks.clone()).await;
    let mut sub = env
        .nats
        .client
        .subscribe("fanjet.notify.note.n-1.>")
        .await
        .unwrap();
    env.worker(seed_worker(&env, "note", 1));
    assert!(
        env.submit("note", json!({"job_id": "n-1", "input": {"count": 20}}))
            .await
            .ok
    );
    env.wait_end("n-1", Duration::from_secs(30)).await;

    let mut on_nats = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await {
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Fanjet-Notification-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        on_nats.push((m.subject.to_string(), id));
    }
    let kinds: Vec<&str> = on_nats
        .iter()
        .map(|(s, _)| s.rsplit('.').next().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "completed"
        ],
        "{on_nats:?}"
    );
    assert!(on_nats.iter().all(|(_, id)| id.starts_with("n-1:")));

    // Webhooks: each notification once, after one refused delivery.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().len() < 7 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 7, "{got:?}");
    let mut ids: Vec<&String> = got.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7, "no duplicates");
    assert!(got.iter().any(|(_, b)| b["type"] == "JobCompleted"));

    // A restarted notifier sends nothing again.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_base2, _stop2) = env.serve(hooks).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(received.lock().unwrap().len(), 7);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "no NATS notification repeated"
    );
}

/// The HTTP status a request is answered with.
async fn code(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api_and_metrics_can_have_their_own_listener() {
    let mut env = Env::start().await;
    env.apply(&seed_workflow("tok", "")).await;
    env.manager();
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], fanjet::nats::server::free_port()).into();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], fanjet::nats::server::free_port()).into();
    let options = fanjet::observe::ServeOptions {
        listen,
        webhooks: Webhooks::default(),
        tokens: fanjet::observe::api::ApiTokens {
            admin: Some("s3cret".into()),
            read: Some("look".into()),
        },
        metrics_listen: Some(metrics),
    };
    let (base, _stop) = env.serve_with(options).await;
    let http = reqwest::Client::new();
    assert_eq!(code(http.get(format!("{base}/api/jobs"))).await, 401);
    assert_eq!(
        code(http.get(format!("{base}/api/jobs")).bearer_auth("wrong")).await,
        401
    );
    assert_eq!(
        code(http.get(format!("{base}/api/jobs")).bearer_auth("s3cret")).await,
        200
    );
    assert_eq!(code(http.get(format!("{base}/metrics"))).await, 401);
    assert_eq!(code(http.get(format!("{base}/healthz"))).await, 200);
    assert_eq!(
        code(http.get(format!("{base}/"))).await,
        200,
        "the page shell loads, then asks for the token"
    );
    let r = http
        .post(format!("{base}/api/jobs"))
        .bearer_auth("s3cret")
        .json(&json!({"workflow": "tok", "job_id": "t-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    env.wait_for("t-1", Duration::from_secs(10), "recorded", |_| true)
        .await;
    assert_eq!(
        code(http.get(format!("{base}/api/jobs/t-1/stream"))).await,
        401
    );
    let sse = http
        .get(format!("{base}/api/jobs/t-1/stream?access_token=look"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        sse.status().as_u16(),
        200,
        "EventSource cannot send headers: the event stream takes the token as a query parameter"
    );
    drop(sse);
    // Anywhere else a token in the URL is refused: it would land in logs.
    assert_eq!(
        code(http.get(format!("{base}/api/jobs?access_token=s3cret"))).await,
        401
    );
    // The read token reads, and changes nothing.
    assert_eq!(
        code(http.get(format!("{base}/api/jobs/t-1")).bearer_auth("look")).await,
        200
    );
    let submit = http
        .post(format!("{base}/api/jobs"))
        .bearer_auth("look")
        .json(&json!({"workflow": "tok", "job_id": "t-2"}));
    assert_eq!(code(submit).await, 403);
    assert_eq!(
        code(
            http.post(format!("{base}/api/jobs/t-1/cancel"))
                .bearer_auth("look")
        )
        .await,
        403
    );
    let m = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status().as_u16(), 200);
    assert!(m
        .text()
        .await
        .unwrap()
        .contains("fanjet_jobs_submitted_total"));

    // Exposing the API beyond loopback without a token is refused.
    let open: std::net::SocketAddr = ([0, 0, 0, 0], fanjet::nats::server::free_port()).into();
    let refused = fanjet::observe::api::serve(
        env.nats.clone(),
        open,
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(refused, Err(fanjet::observe::api::ServeError::Exposed(_))),
        "{refused:?}"
    );
}

/// A TCP relay between a client and the nats-server that can swallow
/// what the client sends (as a connection to a node being killed does:
/// the client's writes succeed, the node never reads them) and then cut
/// every connection.
struct Relay {
    url: String,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(upstream: &str) -> Relay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("nats://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (sw, ct) = (swallow.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw_) = server.into_split();
                let (swallow, cut) = (sw.clone(), ct.clone());
                tokio::spawn(async move {
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !swallow.load(Ordering::SeqCst) {
                                sw_.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Relay { url, swallow, cut }
    }
}

/// The subject of the next message on `sub` within `within` seconds.
async fn next_subject(sub: &mut async_nats::Subscriber, within: u64) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(within), sub.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.subject.to_string())
}

/// A notification is not lost with the notifier's connection: one sent
/// into a connection whose node never read it (and the acknowledgement
/// after it) is announced again once the connection is back, because the
/// notifier acknowledges with the server's confirmation; without it, the
/// event came back only after its five-minute ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_sent_into_a_dying_connection_is_announced_again() {
    use fanjet::protocol::{encode_json, Event, StepStarted};
    use std::sync::atomic::Ordering;
    let env = Env::start().await;
    let relay = Relay::start(&env.url()).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(relay.url.as_str())
        .await
        .expect("connect through the relay");
    let notifier_nats = fanjet::nats::Nats::bind(client).await.expect("bind");
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    tokio::spawn(fanjet::observe::notify::run(
        notifier_nats,
        Webhooks::default(),
        cancel,
    ));
    let mut sub = env
        .nats
        .client
        .subscribe("fanjet.notify.relay.>")
        .await
        .unwrap();
    let started = |job: &str| {
        Event::StepStarted(StepStarted {
            job_id: job.into(),
            workflow: "relay".into(),
            step: "s".into(),
            step_index: 0,
            total: 1,
            run: 0,
            at: 1,
        })
    };
    let log = |event: Event| {
        let js = env.nats.js.clone();
        async move {
            js.publish(event.subject(), encode_json(&event).unwrap())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    log(started("rl-1")).await;
    assert_eq!(
        next_subject(&mut sub, 10).await.as_deref(),
        Some("fanjet.notify.relay.rl-1.step_started")
    );

    // The node stops reading the notifier's connection: the next event is
    // delivered to it, and what it sends back goes nowhere; then the
    // connection drops and comes back.
    relay.swallow.store(true, Ordering::SeqCst);
    log(started("rl-2")).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    relay.swallow.store(false, Ordering::SeqCst);
    relay.cut.notify_waiters();
    // rl-1 may come again first (its acknowledgement may have gone into
    // the swallowed connection too): a repeat, which receivers drop by id.
    // rl-2 must come before its ack wait would bring it back anyway.
    let cut = std::time::Instant::now();
    let deadline = cut + fanjet::observe::notify::ACK_WAIT - Duration::from_secs(2);
    let mut next = None;
    while std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        next = tokio::time::timeout(left, sub.next())
            .await
            .ok()
            .flatten()
            .map(|m| m.subject.to_string());
        if next.as_deref() != Some("fanjet.notify.relay.rl-1.step_started") {
            break;
        }
    }
    eprintln!("rl-2 announced again {:?} after the cut", cut.elapsed());
    assert_eq!(
        next.as_deref(),
        Some("fanjet.notify.relay.rl-2.step_started"),
        "the notification was lost with the connection"
    );
}

/// What a scripted webhook saw: requests per notification id, and the ids
/// it took (answered 200).
#[derive(Default)]
struct Seen {
    requests: std::collections::HashMap<String, u32>,
    taken: Vec<String>,
}

/// A webhook whose first request for each notification hangs longer than
/// the notifier's HTTP timeout (10 s); for jobs named `slow-*` it then
/// refuses two more tries, taking the fourth (about 17 s after the first),
/// and takes every other notification's second try.
async fn hanging_webhook() -> (String, Arc<Mutex<Seen>>) {
    use axum::http::{HeaderMap, StatusCode};
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| {
            let seen = s.clone();
            async move {
                let id = headers
                    .get("Fanjet-Notification-Id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let n = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.requests.entry(id.clone()).or_default();
                    *n += 1;
                    *n
                };
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                if id.starts_with("slow-") && n < 4 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                seen.lock().unwrap().taken.push(id);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Waits up to `within` for `check` on what the webhook saw.
async fn seen_within(seen: &Mutex<Seen>, within: Duration, check: impl Fn(&Seen) -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check(&seen.lock().unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(&seen.lock().unwrap())
}

/// An event being delivered to a slow webhook is not delivered twice
/// however long its retries take; one held by a notifier that is killed
/// comes back within the notifier's ack wait (15 s), not after minutes; one
/// held by a notifier told to stop is handed back for the next at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_held_by_a_stopped_or_killed_notifier_comes_back_in_seconds() {
    use fanjet::observe::notify::ACK_WAIT;
    use fanjet::protocol::{encode_json, Event, StepStarted};
    let env = Env::start().await;
    let (hook, seen) = hanging_webhook().await;
    let hooks = Webhooks {
        urls: vec![hook],
        attempts: 6,
        first_backoff: Duration::from_secs(1),
    };
    let notifier = |cancel: tokio_util::sync::CancellationToken| {
        let (url, hooks) = (env.url(), hooks.clone());
        tokio::spawn(async move {
            let client = async_nats::connect(url).await.expect("connect");
            let nats = fanjet::nats::Nats::bind(client).await.expect("bind");
            fanjet::observe::notify::run(nats, hooks, cancel).await
        })
    };
    let log = |job: &str| {
        let event = Event::StepStarted(StepStarted {
            job_id: job.into(),
            workflow: "held".into(),
            step: "s".into(),
            step_index: 0,
            total: 1,
            run: 0,
            at: 1,
        });
        let js = env.nats.js.clone();
        async move {
            js.publish(event.subject(), encode_json(&event).unwrap())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let requests = |seen: &Seen, job: &str| -> u32 {
        seen.requests
            .iter()
            .filter(|(id, _)| id.starts_with(&format!("{job}:")))
            .map(|(_, n)| *n)
            .sum()
    };
    let taken = |seen: &Seen, job: &str| {
        seen.taken
            .iter()
            .filter(|id| id.starts_with(&format!("{job}:")))
            .count()
    };

    // Retries outlasting the ack wait: delivered once, taken once.
    let first = tokio_util::sync::CancellationToken::new();
    let killed = notifier(first.clone());
    log("slow-1").await;
    assert!(
        seen_within(&seen, Duration::from_secs(40), |s| taken(s, "slow-1") == 1).await,
        "the slow webhook never took the notification"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slow = requests(&seen.lock().unwrap(), "slow-1");
    assert_eq!(
        slow, 4,
        "delivered again while its webhook was being retried ({slow} requests, not 4)"
    );

    // Killed mid-delivery: the next notifier sends it within the ack wait.
    log("killed-1").await;
    assert!(
        seen_within(&seen, Duration::from_secs(10), |s| requests(s, "killed-1")
            == 1)
        .await
    );
    killed.abort();
    let _ = killed.await;
    let second = tokio_util::sync::CancellationToken::new();
    let stopped = notifier(second.clone());
    let at = std::time::Instant::now();
    assert!(
        seen_within(&seen, ACK_WAIT + Duration::from_secs(10), |s| taken(
            s, "killed-1"
        ) == 1)
        .await,
        "a killed notifier's event did not come back within its ack wait"
    );
    eprintln!(
        "killed notifier's event taken {:?} after the kill",
        at.elapsed()
    );

    // Told to stop mid-delivery: handed back, the next notifier sends it
    // at once (well before the ack wait).
    log("stopped-1").await;
    assert!(
        seen_within(&seen, Duration::from_secs(10), |s| requests(s, "stopped-1")
            == 1)
        .await
    );
    second.cancel();
    stopped
        .await
        .expect("join")
        .expect("the notifier stops cleanly");
    let at = std::time::Instant::now();
    let third = tokio_util::sync::CancellationToken::new();
    let _last = notifier(third.clone());
    let _stop = third.drop_guard();
    assert!(
        seen_within(&seen, Duration::from_secs(5), |s| taken(s, "stopped-1")
            == 1)
        .await,
        "a stopped notifier's event was not handed back"
    );
    eprintln!(
        "stopped notifier's event taken {:?} after the stop",
        at.elapsed()
    );
    assert_eq!(taken(&seen.lock().unwrap(), "killed-1"), 1);
}
