//! Operability end to end: the Prometheus endpoint, gRPC health on
//! shutdown, gRPC-Web and CORS.
//!
//! The metrics recorder is process-wide, so only `metrics_count_jobs_and_agents`
//! in this binary enqueues jobs or connects agents.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use prost::Message;
use tether::v1 as pb;
use tether_tests::{hello, http1, job, sample, scrape, DataDir, Extras, Options, RawAgent, TestServer, WAIT};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const DASH: &str = "https://dash.example.com";

async fn start(dir: &DataDir, extras: Extras) -> TestServer {
    TestServer::start_with(dir.path().to_path_buf(), Options::default(), extras).await
}

/// Scrapes until `sample` equals `want` (bounded by [`WAIT`]); returns the
/// last scrape.
async fn scrape_until(server: &TestServer, name_and_labels: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(server).await;
        if sample(&text, name_and_labels) == Some(want) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name_and_labels} never became {want}:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn metrics_count_jobs_and_agents() {
    let dir = DataDir::new();
    let server = start(&dir, Extras { metrics: true, ..Default::default() }).await;
    let before = scrape(&server).await;
    let enqueued_before = sample(&before, "tether_jobs_enqueued_total").unwrap_or(0.0);
    let succeeded_before = sample(&before, "tether_jobs_finished_total{state=\"succeeded\"}").unwrap_or(0.0);
    assert_eq!(sample(&before, "tether_serving"), Some(1.0), "{before}");

    let mut q = server.queue().await;
    for i in 0..3 {
        q.enqueue_job(job("metrics", &format!("job {i}"))).await.expect("enqueue");
    }
    let text = scrape(&server).await;
    assert_eq!(sample(&text, "tether_queue_jobs{state=\"queued\"}"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "tether_queue_queued_jobs{priority=\"normal\"}"), Some(3.0), "{text}");
    for _ in 0..3 {
        let claimed = q
            .claim_job(pb::ClaimJobRequest { worker_id: "w".into(), ..Default::default() })
            .await
            .expect("claim")
            .into_inner()
            .job
            .expect("a job");
        q.start_job(pb::StartJobRequest {
            id: claimed.id.clone(),
            attempt: claimed.attempt,
            fencing_token: claimed.fencing_token,
        })
        .await
        .expect("start");
        q.complete_job(pb::CompleteJobRequest {
            id: claimed.id,
            attempt: claimed.attempt,
            fencing_token: claimed.fencing_token,
            result: Bytes::from_static(b"ok"),
        })
        .await
        .expect("complete");
    }

    let text = scrape_until(&server, "tether_jobs_finished_total{state=\"succeeded\"}", succeeded_before + 3.0).await;
    assert_eq!(sample(&text, "tether_jobs_enqueued_total"), Some(enqueued_before + 3.0), "{text}");
    assert_eq!(sample(&text, "tether_jobs_finished_total{state=\"failed\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "tether_dispatch_latency_seconds_count"), Some(3.0), "{text}");
    assert!(text.contains("tether_dispatch_latency_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
    assert!(sample(&text, "tether_store_commit_seconds_count").is_some_and(|n| n >= 3.0), "{text}");
    assert_eq!(sample(&text, "tether_queue_jobs{state=\"succeeded\"}"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "tether_queue_jobs{state=\"queued\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "tether_metrics_events_dropped_total"), Some(0.0), "{text}");
    assert!(text.contains("# TYPE tether_jobs_enqueued_total counter"), "{text}");
    assert!(text.contains("# TYPE tether_dispatch_latency_seconds histogram"), "{text}");

    // An agent on the stream: one open stream, one connected agent.
    let agent = RawAgent::connect(&server, hello("metrics-agent", 2)).await.expect("connect");
    let text = scrape_until(&server, "tether_agent_streams", 1.0).await;
    let connected: f64 = ["registering", "healthy", "degraded"]
        .iter()
        .filter_map(|h| sample(&text, &format!("tether_agents{{health=\"{h}\",connected=\"true\"}}")))
        .sum();
    assert_eq!(connected, 1.0, "{text}");
    agent.kill();
    scrape_until(&server, "tether_agent_streams", 0.0).await;

    // Anything but /metrics is not found.
    let addr = server.metrics_addr.expect("metrics");
    let (parts, _) = http1(addr, Request::get("/").header("host", "x").body(Full::default()).expect("request")).await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn health_goes_not_serving_on_shutdown() {
    let dir = DataDir::new();
    let mut server = start(&dir, Extras::default()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tether.v1.QueueService", "tether.v1.AgentService"] {
        let status =
            health.check(HealthCheckRequest { service: service.into() }).await.expect("check").into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
    let first = tokio::time::timeout(WAIT, watch.message()).await.expect("in time").expect("ok").expect("open");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    server.begin_stop();
    loop {
        let next = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("a health update before the server exits")
            .expect("watch ok")
            .expect("watch open until NOT_SERVING is seen");
        if next.status == ServingStatus::NotServing as i32 {
            break;
        }
        assert_eq!(next.status, ServingStatus::Serving as i32);
    }
    drop(watch);
    drop(health);
    server.stop().await;
}

/// A gRPC-Web frame: flag byte, big-endian length, payload.
fn frame(flag: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flag);
    out.put_u32(u32::try_from(payload.len()).expect("small"));
    out.put_slice(payload);
    out.freeze()
}

fn grpc_web_request(addr: std::net::SocketAddr, origin: Option<&str>) -> Request<Full<Bytes>> {
    let body = frame(0, &pb::GetQueueStatsRequest::default().encode_to_vec());
    let mut request = Request::post("/tether.v1.QueueService/GetQueueStats")
        .header("host", addr.to_string())
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("accept", "application/grpc-web+proto");
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    request.body(Full::new(body)).expect("request")
}

fn preflight(addr: std::net::SocketAddr, origin: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri("/tether.v1.QueueService/GetQueueStats")
        .header("host", addr.to_string())
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web,x-user-agent")
        .body(Full::default())
        .expect("request")
}

#[tokio::test]
async fn grpc_web_call_is_answered_with_trailers() {
    let dir = DataDir::new();
    let server = start(&dir, Extras { cors_allow_origins: vec![DASH.into()], ..Default::default() }).await;
    let (parts, mut body) = http1(server.addr, grpc_web_request(server.addr, Some(DASH))).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers.get("content-type").expect("content type"), "application/grpc-web+proto");
    assert_eq!(parts.headers.get("access-control-allow-origin").expect("allowed origin"), DASH);
    let exposed = parts.headers.get("access-control-expose-headers").expect("exposed").to_str().expect("ascii");
    assert!(exposed.contains("grpc-status"), "{exposed}");

    let mut message = None;
    let mut trailers = None;
    while body.has_remaining() {
        assert!(body.remaining() >= 5, "a whole frame header");
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let payload = body.split_to(len);
        match flag {
            0x00 => message = Some(pb::GetQueueStatsResponse::decode(payload).expect("a GetQueueStatsResponse")),
            0x80 => trailers = Some(String::from_utf8(payload.to_vec()).expect("ascii trailers")),
            other => panic!("unexpected frame flag {other:#x}"),
        }
    }
    message.expect("a response message");
    let trailers = trailers.expect("a trailer frame").to_ascii_lowercase();
    assert!(trailers.lines().any(|l| l.trim() == "grpc-status:0"), "{trailers}");
    server.stop().await;
}

#[tokio::test]
async fn cors_preflight_is_allowed_only_for_configured_origins() {
    let dir = DataDir::new();
    let server = start(&dir, Extras { cors_allow_origins: vec![DASH.into()], ..Default::default() }).await;
    let (parts, _) = http1(server.addr, preflight(server.addr, DASH)).await;
    assert!(parts.status.is_success(), "{:?}", parts.status);
    assert_eq!(parts.headers.get("access-control-allow-origin").expect("allowed origin"), DASH);
    let methods = parts.headers.get("access-control-allow-methods").expect("methods").to_str().expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let headers = parts.headers.get("access-control-allow-headers").expect("headers").to_str().expect("ascii");
    assert!(headers.contains("x-grpc-web") && headers.contains("content-type"), "{headers}");

    let (parts, _) = http1(server.addr, preflight(server.addr, "https://evil.example.com")).await;
    assert!(parts.headers.get("access-control-allow-origin").is_none(), "{:?}", parts.headers);
    server.stop().await;

    // Closed by default: no CORS headers at all without configured origins,
    // while gRPC-Web itself still works (for same-origin or non-browser use).
    let dir = DataDir::new();
    let server = start(&dir, Extras::default()).await;
    let (parts, _) = http1(server.addr, preflight(server.addr, DASH)).await;
    assert!(!parts.headers.keys().any(|k| k.as_str().starts_with("access-control-")), "{:?}", parts.headers);
    let (parts, body) = http1(server.addr, grpc_web_request(server.addr, Some(DASH))).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert!(parts.headers.get("access-control-allow-origin").is_none(), "{:?}", parts.headers);
    assert!(!body.is_empty());
    server.stop().await;
}
