//! Precedence of configuration sources including the environment: file <
//! environment < flag. This binary holds one test, the only one that sets
//! process environment variables, so no other test thread reads them
//! concurrently.

use std::io::Write;
use std::time::Duration;

use tether_server::config::load_from;

#[test]
fn file_then_environment_then_flags() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(
        br#"
listen = "127.0.0.1:6000"
heartbeat-interval = "2s"
reconnect-grace = "1m"
max-agent-streams = 10
cors-allow-origins = ["https://file.example"]
"#,
    )
    .expect("write");
    std::env::set_var("TETHER_CONFIG", file.path());
    std::env::set_var("TETHER_LISTEN", "127.0.0.1:6001");
    std::env::set_var("TETHER_HEARTBEAT_INTERVAL", "3s");
    std::env::set_var("TETHER_CORS_ALLOW_ORIGINS", "https://a.example,https://b.example");
    std::env::set_var("TETHER_METRICS_LISTEN", "127.0.0.1:9999");

    let args = load_from(["server", "--heartbeat-interval", "4s"]).expect("valid");
    assert_eq!(args.config.as_deref(), Some(file.path()), "TETHER_CONFIG names the file");
    assert_eq!(args.listen, "127.0.0.1:6001".parse().unwrap(), "environment over file");
    assert_eq!(args.heartbeat_interval, Duration::from_secs(4), "flag over environment over file");
    assert_eq!(args.reconnect_grace, Duration::from_secs(60), "file over default");
    assert_eq!(args.max_agent_streams, Some(10), "file over default");
    assert_eq!(args.cors_allow_origins, vec!["https://a.example", "https://b.example"], "comma-separated env list");
    assert_eq!(args.metrics_listen, Some("127.0.0.1:9999".parse().unwrap()));

    // A bad environment value is refused by clap, naming the flag.
    std::env::set_var("TETHER_RECONNECT_GRACE", "soon");
    let error = load_from(["server"]).expect_err("bad env value").to_string();
    assert!(error.contains("reconnect-grace"), "{error}");

    for key in [
        "TETHER_CONFIG",
        "TETHER_LISTEN",
        "TETHER_HEARTBEAT_INTERVAL",
        "TETHER_CORS_ALLOW_ORIGINS",
        "TETHER_METRICS_LISTEN",
        "TETHER_RECONNECT_GRACE",
    ] {
        std::env::remove_var(key);
    }
}
