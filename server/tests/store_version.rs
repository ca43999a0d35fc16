//! The `tether server` process and store schema versions: a data directory
//! stamped by a newer release is refused at start-up, before anything is
//! served or written, with a message naming both versions (exit code 1, no
//! panic); the data directory written by commit 23acfb8 starts, migrated.

use std::path::Path;
use std::process::{Command, Stdio};

use redb::{ReadableDatabase, TableDefinition};
use tether_server::store::embedded::SCHEMA_VERSION;

/// `store_meta`, whose layout never changes (see `store/embedded/schema.rs`).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("store_meta");

fn stamp(dir: &Path, version: u64, written_by: &str) {
    let db = redb::Database::create(dir.join("tether.redb")).expect("create");
    let txn = db.begin_write().expect("txn");
    {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert("schema_version", version.to_le_bytes().as_slice()).expect("insert");
        meta.insert("written_by", written_by.as_bytes()).expect("insert");
    }
    txn.commit().expect("commit");
}

fn stored_version(dir: &Path) -> u64 {
    let db = redb::Database::create(dir.join("tether.redb")).expect("open");
    let txn = db.begin_read().expect("txn");
    let meta = txn.open_table(META).expect("meta");
    let version = meta.get("schema_version").expect("get").expect("a version");
    u64::from_le_bytes(version.value().try_into().expect("8 bytes"))
}

#[test]
fn a_store_of_a_newer_schema_version_is_refused_by_the_server_with_both_versions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let newer = SCHEMA_VERSION + 1;
    stamp(dir.path(), newer, "tether 99.0.0");
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["server", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("TETHER_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run tether server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    for part in [
        format!("opening the store in {}", dir.path().display()),
        format!("holds store schema version {newer} (last written by tether 99.0.0)"),
        format!("reads store schema versions up to {SCHEMA_VERSION}"),
        "run a newer tether".to_string(),
    ] {
        assert!(error.contains(&part), "{part:?} in {error}");
    }
    assert!(!stderr.contains("tether server listening"), "{stderr}");
    assert_eq!(stored_version(dir.path()), newer, "the store is left as it was");
}

#[test]
fn the_server_starts_on_the_store_written_by_23acfb8_and_stamps_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/embedded-v23acfb8/tether.redb");
    std::fs::copy(fixture, dir.path().join("tether.redb")).expect("copy the fixture");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["server", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("TETHER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tether server");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut migrated = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.expect("stderr line");
        migrated |= line.contains("store schema migrated");
        if line.contains("tether server listening") {
            break;
        }
    }
    // The migration is committed before the server listens: no clean stop
    // needed.
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(migrated, "the start-up log says the store was migrated");
    assert_eq!(stored_version(dir.path()), SCHEMA_VERSION);
}
