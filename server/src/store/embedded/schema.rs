//! The embedded store's schema version: which layout of tables and records
//! a data directory holds, kept in the `store_meta` table next to the
//! release that last wrote it.
//!
//! [`check_and_migrate`] runs when the store opens, before anything else is
//! read or created:
//! - a store of a newer schema version than [`SCHEMA_VERSION`] is refused
//!   with [`StoreError::NewerSchema`], untouched;
//! - an older one (a store without `store_meta` was written by a release
//!   before schema versions: version 1) is brought up to date by
//!   [`MIGRATIONS`], in order, each step in one write transaction that also
//!   records the version it reached, so a crash between steps resumes at
//!   the next one;
//! - a new, empty file is stamped when its tables are created.
//!
//! The layout of `store_meta` itself never changes (an older release must
//! always be able to read the version): keys are strings, values bytes;
//! `schema_version` is a `u64`, little-endian, and `written_by` UTF-8 text.

use redb::{Database, ReadableDatabase, TableDefinition, TableError, WriteTransaction};

use super::io_err;
use crate::store::{StoreError, StoreResult};

/// The store's own facts; its key and value types are frozen.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("store_meta");
const KEY_SCHEMA_VERSION: &str = "schema_version";
const KEY_WRITTEN_BY: &str = "written_by";

/// The schema version this release writes, and the newest it opens.
pub const SCHEMA_VERSION: u64 = 8;

/// The version of a store without `store_meta`: written by a release before
/// schema versions (up to commit 23acfb8).
pub const UNVERSIONED: u64 = 1;

/// How a store names the release that wrote it.
pub const RELEASE: &str = concat!("tether ", env!("CARGO_PKG_VERSION"));

/// One step from schema version `to - 1` to `to`.
pub(super) struct Migration {
    pub to: u64,
    pub what: &'static str,
    /// Rewrites what the step changes, inside the step's transaction.
    pub apply: fn(&WriteTransaction) -> StoreResult<()>,
}

/// Every step, in order; the last one reaches [`SCHEMA_VERSION`]. A change of
/// tables or records that an older release would misread adds a step here
/// and raises [`SCHEMA_VERSION`]. Steps run before the journal is replayed
/// (`super::writer::Writer::recover`): a step that changes what a journaled
/// write does must replay the journal by the old rules first.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration { to: 2, what: "record the store's schema version (tables and records unchanged)", apply: |_| Ok(()) },
    // The log's table is created when the store opens. The version rises so
    // that an older release, which would change jobs without logging them
    // (a watcher resuming from a cursor would miss those changes), refuses
    // the store instead.
    Migration { to: 3, what: "add the job event log (job_events)", apply: |_| Ok(()) },
    // Acknowledged writes may now be in the journal (tether.journal) and not
    // yet in this file: an older release would open the file without them.
    Migration { to: 4, what: "acknowledge writes from the journal (tether.journal)", apply: |_| Ok(()) },
    // Job records of format 3 (dashboard jobs) and journal records of format
    // 2: an older release would skip such jobs as corrupt. Older records are
    // read as they are.
    Migration { to: 5, what: "dashboard jobs (job record format 3, journal format 2)", apply: |_| Ok(()) },
    // The table is created when the store opens. The version rises because
    // an older release would not know the records (the control plane's own
    // state) and could not replay a journal holding record writes.
    Migration { to: 6, what: "add control-plane records (records table)", apply: |_| Ok(()) },
    // Log records of format 2 and journal records of format 3: an older
    // release would skip such chunks as corrupt and could not replay the
    // journal. Older records are read as they are.
    Migration {
        to: 7,
        what: "log chunks keep the agent's time (log record format 2, journal format 3)",
        apply: |_| Ok(()),
    },
    // The table is created when the store opens. The version rises because
    // an older release would change agents and deployments without logging
    // them and could not replay a journal holding logged writes.
    Migration { to: 8, what: "add the activity log (activity_log)", apply: |_| Ok(()) },
];

/// What `store_meta` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSchema {
    pub version: u64,
    pub written_by: String,
}

/// What a data directory holds before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// A new file: no tables at all.
    Empty,
    Versioned(StoredSchema),
}

fn read(db: &Database) -> StoreResult<Found> {
    let txn = db.begin_read().map_err(io_err)?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => {
            let has_tables = txn.list_tables().map_err(io_err)?.next().is_some();
            return Ok(match has_tables {
                true => Found::Versioned(StoredSchema {
                    version: UNVERSIONED,
                    written_by: "a release before store schema versions".into(),
                }),
                false => Found::Empty,
            });
        }
        Err(e) => return Err(StoreError::Corrupt(format!("store_meta: {e}"))),
    };
    let version = match meta.get(KEY_SCHEMA_VERSION).map_err(io_err)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| {
                StoreError::Corrupt(format!("store_meta schema_version is {} bytes, not 8", v.value().len()))
            })?;
            u64::from_le_bytes(bytes)
        }
        None => return Err(StoreError::Corrupt("store_meta holds no schema_version".into())),
    };
    if version < UNVERSIONED {
        return Err(StoreError::Corrupt(format!("store schema version {version} was never written by tether")));
    }
    let written_by = match meta.get(KEY_WRITTEN_BY).map_err(io_err)? {
        Some(v) => String::from_utf8_lossy(v.value()).into_owned(),
        None => "an unnamed release".into(),
    };
    Ok(Found::Versioned(StoredSchema { version, written_by }))
}

/// Records `version` and this release in `store_meta`, inside `txn`.
pub(super) fn stamp(txn: &WriteTransaction, version: u64) -> StoreResult<()> {
    let mut meta = txn.open_table(META).map_err(io_err)?;
    meta.insert(KEY_SCHEMA_VERSION, version.to_le_bytes().as_slice()).map_err(io_err)?;
    meta.insert(KEY_WRITTEN_BY, RELEASE.as_bytes()).map_err(io_err)?;
    Ok(())
}

/// Refuses a store of a newer schema, migrates an older one. Returns what
/// the store held before (`None` for a new file). `location` names the
/// store in errors.
pub(super) fn check_and_migrate(db: &Database, location: &str) -> StoreResult<Option<StoredSchema>> {
    let stored = match read(db)? {
        Found::Empty => return Ok(None),
        Found::Versioned(stored) => stored,
    };
    if stored.version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            location: location.to_string(),
            found: stored.version,
            supported: SCHEMA_VERSION,
            written_by: stored.written_by,
        });
    }
    for step in MIGRATIONS.iter().filter(|m| m.to > stored.version) {
        let txn = db.begin_write().map_err(io_err)?;
        (step.apply)(&txn)?;
        stamp(&txn, step.to)?;
        txn.commit().map_err(io_err)?;
        tracing::info!(
            store = location,
            from = step.to - 1,
            to = step.to,
            step = step.what,
            previous_writer = %stored.written_by,
            "store schema migrated"
        );
    }
    Ok(Some(stored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::{EmbeddedOptions, EmbeddedStore, JOBS};
    use crate::store::{conformance, Store, Write, WriteOutcome};

    fn stored(dir: &std::path::Path) -> Found {
        let db = Database::create(dir.join("tether.redb")).expect("open");
        read(&db).expect("read")
    }

    fn set_version(dir: &std::path::Path, version: u64, written_by: &str) {
        let db = Database::create(dir.join("tether.redb")).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert(KEY_SCHEMA_VERSION, version.to_le_bytes().as_slice()).expect("insert");
            meta.insert(KEY_WRITTEN_BY, written_by.as_bytes()).expect("insert");
        }
        txn.commit().expect("commit");
    }

    #[test]
    fn the_steps_run_from_the_first_version_to_this_one_without_gaps() {
        let tos: Vec<u64> = MIGRATIONS.iter().map(|m| m.to).collect();
        let expected: Vec<u64> = (UNVERSIONED + 1..=SCHEMA_VERSION).collect();
        assert_eq!(tos, expected);
    }

    #[test]
    fn a_new_store_is_stamped_with_this_version_and_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open"));
        let want = StoredSchema { version: SCHEMA_VERSION, written_by: RELEASE.into() };
        assert_eq!(stored(dir.path()), Found::Versioned(want));
    }

    #[tokio::test]
    async fn a_store_without_a_version_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("open");
            let job = conformance::job("a", 1, "q", Some("key"));
            assert_eq!(store.write(vec![Write::create(job)]).await.expect("write"), [WriteOutcome::Applied]);
            // As releases before schema versions left it.
            let txn = store.db.begin_write().expect("txn");
            assert!(txn.delete_table(META).expect("delete"));
            txn.commit().expect("commit");
        }
        let old = Found::Versioned(StoredSchema {
            version: UNVERSIONED,
            written_by: "a release before store schema versions".into(),
        });
        assert_eq!(stored(dir.path()), old);
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("reopen");
        assert_eq!(store.get_job("a").await.expect("get").map(|j| j.spec.queue), Some("q".into()));
        assert!(store.find_by_idempotency_key("q", "key").await.expect("find").is_some());
        drop(store);
        let want = StoredSchema { version: SCHEMA_VERSION, written_by: RELEASE.into() };
        assert_eq!(stored(dir.path()), Found::Versioned(want));
    }

    #[test]
    fn a_store_of_a_newer_schema_is_refused_untouched_with_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        set_version(dir.path(), SCHEMA_VERSION + 1, "tether 9.9.9");
        let err = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).err().expect("refused");
        match &err {
            StoreError::NewerSchema { found, supported, written_by, .. } => {
                assert_eq!(
                    (*found, *supported, written_by.as_str()),
                    (SCHEMA_VERSION + 1, SCHEMA_VERSION, "tether 9.9.9")
                );
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        for part in [
            format!("store schema version {}", SCHEMA_VERSION + 1),
            format!("up to {SCHEMA_VERSION}"),
            "tether 9.9.9".into(),
            "run a newer tether".into(),
        ] {
            assert!(message.contains(&part), "{part:?} in {message}");
        }
        assert!(!err.is_retryable());
        // Nothing was created or rewritten.
        let db = Database::create(dir.path().join("tether.redb")).expect("open");
        let txn = db.begin_read().expect("txn");
        assert!(matches!(txn.open_table(JOBS), Err(TableError::TableDoesNotExist(_))));
        drop(txn);
        drop(db);
        let want = StoredSchema { version: SCHEMA_VERSION + 1, written_by: "tether 9.9.9".into() };
        assert_eq!(stored(dir.path()), Found::Versioned(want));
    }

    #[test]
    fn a_meta_table_that_does_not_say_a_version_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(dir.path().join("tether.redb")).expect("open");
            let txn = db.begin_write().expect("txn");
            txn.open_table(META).expect("meta").insert(KEY_SCHEMA_VERSION, [1u8, 2].as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let err = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).err().expect("refused");
        assert!(matches!(&err, StoreError::Corrupt(m) if m.contains("schema_version")), "{err:?}");
    }
}
