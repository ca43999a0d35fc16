//! The embedded store's journal (`tether.journal`): the groups of writes the
//! writer acknowledged that the database file does not yet hold durably.
//!
//! A durable redb commit rewrites and syncs every page it touched in every
//! table (~0.35 ms more than a commit that is not synced, on a 2-core VM);
//! one record appended here and synced is one small, sequential write into
//! space the file already has (~0.1 ms). So the writer applies a group to
//! the database without syncing it, appends the group to the journal, syncs
//! the journal and only then acknowledges. Every so often a *checkpoint*
//! (any durable database commit) makes everything before it durable in the
//! database itself, and the journal starts again from its beginning. After
//! a crash the database opens at its last durable commit, and the records
//! after it are applied again, in order: applying a group is deterministic
//! given the state before it, so the replay rebuilds exactly the state that
//! was acknowledged.
//!
//! A record is `len: u32 | crc32(seq, run, payload): u32 | seq: u64 |
//! run: u64 | payload` (little-endian), the payload a format byte and the
//! group's batches in postcard. Every group the database applied carries
//! its `seq` (`journal_seq` in the counters table), so start-up knows which
//! records the database already holds. The file is reused from its start
//! after a checkpoint without being cleared, and each such *run* has a
//! random id: what follows the last record of the current run is space
//! never written (a zero length), a record torn by a crash (its checksum
//! fails) or a record of an earlier run (another run id; its seq need not
//! be out of order: with `--unsafe-sync-every`, a crash can lose unsynced
//! records and the next run reuse their seqs). Reading stops at each.
//!
//! The payload's format byte covers the postcard layout of [`Write`] and
//! every type inside it (jobs, agents, pools, transitions, log chunks):
//! a change to any of them must raise it (`the_record_layout_is_frozen`
//! fails until it does) and keep a decoder for the old one, or a release
//! started after a crash of the previous one could not replay its journal.
//! A new kind of write is the exception: added as the last variant of
//! [`Write`] it leaves every older record's bytes as they were (postcard
//! numbers variants in order), so the format stays; the store's schema
//! version keeps older releases, which could not read it, away.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::io_err;
use crate::store::legacy::{WriteV1, WriteV2};
use crate::store::{StoreError, StoreResult, Write};

/// The journal's file name in the data directory.
pub(super) const FILE_NAME: &str = "tether.journal";

/// The journal's record formats: the first byte of every payload. Format 1
/// held jobs inline in job format 2's layout; format 2 holds each job as a
/// versioned job record.
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
/// Format 3 holds each log chunk as a versioned log record too.
const FORMAT_V3: u8 = 3;

/// Length, checksum, seq and run.
const HEADER_BYTES: usize = 24;

/// The journal is checkpointed once it holds this much, so it stays this
/// size and a restart replays at most this much. A checkpoint syncs every
/// database page written since the last one and holds up acknowledgements
/// meanwhile: at 1 MiB it took ~5 ms (max ~10), at 16 MiB 25–30 ms, which
/// raised the acknowledgement p99 at 1,000 enqueues/s from ~2.3 to 40 ms.
pub(super) const CHECKPOINT_BYTES: u64 = 1 << 20;

/// The file grows by this much at a time, written with zeros and synced
/// once, so that appending a record changes no file metadata and syncing it
/// is one data write.
const GROW_BYTES: u64 = 256 << 10;

/// A group of batches read back from the journal.
#[derive(Debug)]
pub(super) struct Record {
    pub seq: u64,
    pub batches: Vec<Vec<Write>>,
}

/// What [`Journal::append`] did with a group.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Appended {
    /// Written (not yet synced).
    Written,
    /// Larger than a whole journal: not written; the caller makes the group
    /// durable with a checkpoint instead.
    TooLarge,
    /// The group does not encode (postcard refuses, e.g., a time before
    /// 1970): not written; as with `TooLarge`, a checkpoint instead.
    Unencodable(String),
    /// It does not fit after what the journal holds: the caller checkpoints
    /// and appends again.
    Full,
}

pub(super) struct Journal {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    end: u64,
    /// Bytes of the file already written (zeros or records).
    allocated: u64,
    /// The current run's id.
    run: u64,
    buf: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads the records of its
    /// current run. The journal is positioned at its start: the caller
    /// replays what the database lacks, checkpoints, and then appends.
    pub fn open(dir: &Path) -> StoreResult<(Journal, Vec<RawRecord>)> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err(format!("open {}: {e}", path.display())))?;
        let allocated = file.metadata().map_err(|e| io_err(format!("stat {}: {e}", path.display())))?.len();
        if allocated == 0 {
            // A new file: its directory entry must be durable too.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(format!("sync {}: {e}", dir.display())))?;
        }
        // A run never holds more than CHECKPOINT_BYTES.
        let mut bytes = Vec::new();
        (&file)
            .take(CHECKPOINT_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| io_err(format!("read {}: {e}", path.display())))?;
        let records = parse(&bytes);
        let journal = Journal { file, path, end: 0, allocated, run: rand::random(), buf: Vec::new() };
        Ok((journal, records))
    }

    /// Whether no record was written since the last [`Journal::restart`].
    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// Bytes written since the last restart.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Appends one group (not synced: see [`Journal::sync`]).
    pub fn append(&mut self, seq: u64, batches: &[&[Write]]) -> StoreResult<Appended> {
        self.buf.clear();
        self.buf.resize(HEADER_BYTES, 0);
        self.buf.push(FORMAT_V3);
        match postcard::to_extend(batches, std::mem::take(&mut self.buf)) {
            Ok(buf) => self.buf = buf,
            Err(e) => return Ok(Appended::Unencodable(e.to_string())),
        }
        let record_len = self.buf.len() as u64;
        if record_len > CHECKPOINT_BYTES {
            return Ok(Appended::TooLarge);
        }
        if self.end.saturating_add(record_len) > CHECKPOINT_BYTES {
            return Ok(Appended::Full);
        }
        let payload_len = u32::try_from(self.buf.len() - HEADER_BYTES)
            .map_err(|_| StoreError::Corrupt("journal record over 4 GiB".into()))?;
        let crc = checksum(seq, self.run, &self.buf[HEADER_BYTES..]);
        self.buf[0..4].copy_from_slice(&payload_len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.buf[8..16].copy_from_slice(&seq.to_le_bytes());
        self.buf[16..24].copy_from_slice(&self.run.to_le_bytes());
        let end = self.end + record_len;
        self.allocate(end)?;
        self.file
            .write_all_at(&self.buf, self.end)
            .map_err(|e| io_err(format!("write {}: {e}", self.path.display())))?;
        self.end = end;
        Ok(Appended::Written)
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> StoreResult<()> {
        self.file.sync_data().map_err(|e| io_err(format!("sync {}: {e}", self.path.display())))
    }

    /// Starts a new run at the start of the file, after a checkpoint made
    /// every record so far durable in the database.
    pub fn restart(&mut self) {
        self.end = 0;
        self.run = rand::random();
    }

    /// Extends the written part of the file to cover `end`.
    fn allocate(&mut self, end: u64) -> StoreResult<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.div_ceil(GROW_BYTES).saturating_mul(GROW_BYTES);
        let zeros = vec![0u8; (target - self.allocated) as usize];
        self.file
            .write_all_at(&zeros, self.allocated)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_err(format!("grow {}: {e}", self.path.display())))?;
        self.allocated = target;
        Ok(())
    }
}

/// A record whose header and checksum are valid; its payload is decoded
/// only if it is replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawRecord {
    pub seq: u64,
    pub payload: Vec<u8>,
}

impl RawRecord {
    pub fn decode(&self) -> StoreResult<Record> {
        let corrupt = |what: String| StoreError::Corrupt(format!("journal record {}: {what}", self.seq));
        match self.payload.split_first() {
            Some((&FORMAT_V3, rest)) => postcard::from_bytes::<Vec<Vec<Write>>>(rest)
                .map(|batches| Record { seq: self.seq, batches })
                .map_err(|e| corrupt(e.to_string())),
            Some((&FORMAT_V2, rest)) => postcard::from_bytes::<Vec<Vec<WriteV2>>>(rest)
                .map(|batches| Record {
                    seq: self.seq,
                    batches: batches.into_iter().map(|b| b.into_iter().map(Write::from).collect()).collect(),
                })
                .map_err(|e| corrupt(e.to_string())),
            Some((&FORMAT_V1, rest)) => {
                let batches = postcard::from_bytes::<Vec<Vec<WriteV1>>>(rest).map_err(|e| corrupt(e.to_string()))?;
                let batches = batches
                    .into_iter()
                    .map(|batch| batch.into_iter().map(WriteV1::upgrade).collect::<Result<Vec<_>, _>>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(corrupt)?;
                Ok(Record { seq: self.seq, batches })
            }
            Some((format, _)) => {
                Err(corrupt(format!("format {format} is newer than this release reads; run a newer tether")))
            }
            None => Err(corrupt("empty".into())),
        }
    }
}

pub(super) fn checksum(seq: u64, run: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&run.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The current run: records from the start while each is whole, its
/// checksum holds, its run is the first record's and its seq follows the
/// one before.
fn parse(bytes: &[u8]) -> Vec<RawRecord> {
    let mut records: Vec<RawRecord> = Vec::new();
    let mut first_run = None;
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at.saturating_add(HEADER_BYTES)) {
        let mut word = [0u8; 8];
        word[..4].copy_from_slice(&header[0..4]);
        let len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        word.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(word);
        word.copy_from_slice(&header[16..24]);
        let run = u64::from_le_bytes(word);
        let start = at + HEADER_BYTES;
        let Some(payload) = start.checked_add(len).and_then(|end| bytes.get(start..end)) else { break };
        if len == 0 || checksum(seq, run, payload) != crc || *first_run.get_or_insert(run) != run {
            break;
        }
        if records.last().is_some_and(|last| last.seq.checked_add(1) != Some(seq)) {
            break;
        }
        records.push(RawRecord { seq, payload: payload.to_vec() });
        at = start + len;
    }
    records
}

/// The records the database lacks: those after `applied`, which must start
/// right after it.
pub(super) fn to_replay(records: Vec<RawRecord>, applied: u64) -> StoreResult<Vec<RawRecord>> {
    let missing: Vec<RawRecord> = records.into_iter().filter(|r| r.seq > applied).collect();
    match missing.first() {
        Some(first) if applied.checked_add(1) != Some(first.seq) => Err(StoreError::Corrupt(format!(
            "the journal resumes at group {} but the database ends at group {applied}: acknowledged writes \
             are missing",
            first.seq
        ))),
        _ => Ok(missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn group(id: &str) -> Vec<Write> {
        vec![
            Write::create(conformance::job(id, 1, "q", None)),
            Write::RaiseCounter { name: crate::store::COUNTER_SEQ, value: 9 },
        ]
    }

    fn append(journal: &mut Journal, seq: u64, id: &str) {
        let batch = group(id);
        assert_eq!(journal.append(seq, &[batch.as_slice()]).expect("append"), Appended::Written);
    }

    fn ids(record: &RawRecord) -> Vec<String> {
        let decoded = record.decode().expect("decode");
        decoded
            .batches
            .iter()
            .flatten()
            .filter_map(|w| match w {
                Write::CreateJob { job, .. } => Some(job.id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_read_back_in_order_with_their_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, records) = Journal::open(dir.path()).expect("open");
        assert!(records.is_empty() && journal.is_empty());
        append(&mut journal, 1, "a");
        append(&mut journal, 2, "b");
        journal.sync().expect("sync");
        let (_, records) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(ids(&records[1]), ["b"]);
        match &records[0].decode().expect("decode").batches[0][1] {
            Write::RaiseCounter { name, value } => assert_eq!((*name, *value), (crate::store::COUNTER_SEQ, 9)),
            other => panic!("{other:?}"),
        }
    }

    /// A journal holding records 1 to 3, restarted.
    fn restarted_after_three(dir: &Path) -> Journal {
        let (mut journal, _) = Journal::open(dir).expect("open");
        for (seq, id) in [(1, "a"), (2, "b"), (3, "c")] {
            append(&mut journal, seq, id);
        }
        journal.restart();
        journal
    }

    #[test]
    fn a_new_run_ends_where_the_old_one_shows_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = restarted_after_three(dir.path());
        append(&mut journal, 4, "d");
        journal.sync().expect("sync");
        let (_, records) = Journal::open(dir.path()).expect("reopen");
        // Record 4 overwrote record 1; records 2 and 3 follow but are older.
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn a_record_of_an_earlier_run_does_not_continue_the_current_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        // As after a crash that lost unsynced records 1 to 3: the next run
        // reuses seq 1, and the old record 2 lies right after the new 1.
        let mut journal = restarted_after_three(dir.path());
        append(&mut journal, 1, "x");
        journal.sync().expect("sync");
        let (_, records) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(ids(&records[0]), ["x"]);
    }

    /// The payload layout of every kind of write, frozen: if this fails, a
    /// type inside `Write` changed its postcard layout. Raise `FORMAT_V2`'s
    /// successor, keep decoding the old format, then update the bytes.
    #[test]
    fn the_record_layout_is_frozen() {
        let mut batch = every_kind_of_write_with_a_dashboard_job();
        // Log chunks keep the agent's time (log record format 2).
        let t = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + s);
        batch.push(Write::AppendLog(crate::store::LogChunk {
            job_id: "j".into(),
            attempt: 1,
            sequence: 3,
            stderr: false,
            data: "more".into(),
            time: t(5),
            agent_time: Some(t(4)),
        }));
        assert_frozen(&batch, FROZEN_LAYOUT);
    }

    /// `batch` journals as `hex` and reads back as written.
    fn assert_frozen(batch: &[Write], hex: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(dir.path()).expect("open");
        assert_eq!(journal.append(1, &[batch]).expect("append"), Appended::Written);
        let payload = journal.buf[HEADER_BYTES..].to_vec();
        let written: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(written, hex, "the journal's record layout changed");
        let decoded = RawRecord { seq: 1, payload }.decode().expect("decode");
        assert_eq!(format!("{:?}", decoded.batches), format!("{:?}", vec![batch]));
    }

    /// A record the previous release (journal format 2: log chunks inline)
    /// wrote still replays.
    #[test]
    fn a_format_2_record_reads_as_the_same_writes() {
        let batch = every_kind_of_write_with_a_dashboard_job();
        let decoded = RawRecord { seq: 1, payload: unhex(FROZEN_LAYOUT_V2) }.decode().expect("decode");
        assert_eq!(format!("{:?}", decoded.batches), format!("{:?}", vec![batch]));
        let record = crate::store::Record {
            collection: "env".into(),
            id: "prod".into(),
            version: 3,
            body: bytes::Bytes::from_static(b"body"),
        };
        let decoded = RawRecord { seq: 1, payload: unhex(FROZEN_RECORD_LAYOUT_V2) }.decode().expect("decode");
        let batch = vec![Write::PutRecord { record, expected_version: 2 }];
        assert_eq!(format!("{:?}", decoded.batches), format!("{:?}", vec![batch]));
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
    }

    fn every_kind_of_write_with_a_dashboard_job() -> Vec<Write> {
        let mut batch = every_kind_of_write();
        // A job's record layout is frozen with it (job format 3).
        let mut dashboard_job = conformance::job("d", 2, crate::domain::dashboard::DASHBOARD_QUEUE, None);
        let mut dashboard = crate::domain::dashboard::DashboardJob::new(crate::domain::dashboard::DashboardSpec {
            name: "build".into(),
            requested_by: "ann".into(),
            retry_of: Some("c".into()),
        });
        dashboard.record(&dashboard_job, None, "user:ann", None);
        dashboard_job.dashboard = Some(Box::new(dashboard));
        batch.push(Write::create(dashboard_job));
        batch
    }

    /// A record write's layout, frozen like the others' (it came after
    /// [`FROZEN_LAYOUT`], as the last variant of `Write`).
    #[test]
    fn the_record_write_layout_is_frozen() {
        let record = crate::store::Record {
            collection: "env".into(),
            id: "prod".into(),
            version: 3,
            body: bytes::Bytes::from_static(b"body"),
        };
        assert_frozen(&[Write::PutRecord { record, expected_version: 2 }], FROZEN_RECORD_LAYOUT);
    }

    /// Format 3, one batch of one write: variant 8, "env", "prod", version
    /// 3, body "body", expected version 2.
    const FROZEN_RECORD_LAYOUT: &str = "0301010803656e760470726f640304626f647902";
    /// The same as journal format 2 wrote it.
    const FROZEN_RECORD_LAYOUT_V2: &str = "0201010803656e760470726f640304626f647902";

    /// A record the previous release (journal format 1) wrote still replays.
    #[test]
    fn a_format_1_record_reads_as_the_same_writes() {
        let batch = every_kind_of_write();
        let decoded = RawRecord { seq: 1, payload: unhex(FROZEN_LAYOUT_V1) }.decode().expect("decode");
        assert_eq!(format!("{:?}", decoded.batches), format!("{:?}", vec![batch]));
    }

    fn every_kind_of_write() -> Vec<Write> {
        use crate::domain::{Agent, Health, SchedulingStatus};
        use crate::store::{LogChunk, Transition};
        let t = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + s);
        let job = conformance::job("j", 1, "q", Some("k"));
        let mut running = job.clone();
        running.state = crate::domain::JobState::Running;
        running.version = 2;
        let agent = Agent {
            id: "a".into(),
            name: "n".into(),
            pool: "p".into(),
            labels: [("os".to_string(), "linux".to_string())].into(),
            slots: 4,
            health: Health::Healthy,
            health_reason: String::new(),
            scheduling: SchedulingStatus::Active,
            version: "1".into(),
            create_time: t(0),
            last_seen_time: t(1),
            metrics: Default::default(),
        };
        let pool = crate::domain::Pool { name: "p".into(), ..crate::domain::Pool::default_pool(t(0)) };
        let chunk = LogChunk {
            job_id: "j".into(),
            attempt: 1,
            sequence: 2,
            stderr: true,
            data: "out".into(),
            time: t(3),
            agent_time: None,
        };
        let batch = vec![
            Write::CreateJob { job: Box::new(job.clone()), events: vec![Transition::of(&job, None)] },
            Write::UpdateJob {
                job: Box::new(running.clone()),
                expected_version: 1,
                events: vec![Transition::of(&running, Some(job.state))],
            },
            Write::PutAgent(Box::new(agent)),
            Write::CreatePool(Box::new(pool.clone())),
            Write::PutPool(Box::new(pool)),
            Write::DeletePool { name: "p".into() },
            Write::AppendLog(chunk),
            Write::RaiseCounter { name: crate::store::COUNTER_FENCING, value: 7 },
        ];
        batch
    }

    /// [`every_kind_of_write_with_a_dashboard_job`] as journal format 2
    /// wrote it.
    const FROZEN_LAYOUT_V2: &str = concat!(
        "020109004e02016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e7578031e000001",
        "016b00000196010000000081e2cfaa060081e2cfaa060081e2cfaa06000000000000010100000181e2cfaa0600000000",
        "81e2cfaa0600000000014e02016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e75",
        "78031e000001016b00000196010200000081e2cfaa060081e2cfaa060081e2cfaa060000000000000201010100020281",
        "e2cfaa060000000081e2cfaa0600000000020161016e017001026f73056c696e757804010000013180e2cfaa060081e2",
        "cfaa060000000000000000000000000000030170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa06",
        "0080e2cfaa0600040170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa060080e2cfaa0600050170",
        "06016a010201036f757483e2cfaa0600070d66656e63696e675f746f6b656e07007d030164020b7465746865722e6a6f",
        "62730c7061796c6f6164206f662064010764656661756c7401026f73056c696e7578031e000000000001960100000000",
        "82e2cfaa060082e2cfaa060082e2cfaa060000000000000101056275696c6403616e6e0101630182e2cfaa0600000000",
        "0008757365723a616e6e000000000000",
    );

    /// [`every_kind_of_write_with_a_dashboard_job`] and a chunk with the
    /// agent's time, as journal format 3 writes it.
    const FROZEN_LAYOUT: &str = concat!(
        "03010a004e02016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e7578031e000001",
        "016b00000196010000000081e2cfaa060081e2cfaa060081e2cfaa06000000000000010100000181e2cfaa0600000000",
        "81e2cfaa0600000000014e02016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e75",
        "78031e000001016b00000196010200000081e2cfaa060081e2cfaa060081e2cfaa060000000000000201010100020281",
        "e2cfaa060000000081e2cfaa0600000000020161016e017001026f73056c696e757804010000013180e2cfaa060081e2",
        "cfaa060000000000000000000000000000030170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa06",
        "0080e2cfaa0600040170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa060080e2cfaa0600050170",
        "061102016a010201036f757483e2cfaa060000070d66656e63696e675f746f6b656e07007d030164020b746574686572",
        "2e6a6f62730c7061796c6f6164206f662064010764656661756c7401026f73056c696e7578031e000000000001960100",
        "00000082e2cfaa060082e2cfaa060082e2cfaa060000000000000101056275696c6403616e6e0101630182e2cfaa0600",
        "0000000008757365723a616e6e000000000000061802016a010300046d6f726585e2cfaa06000184e2cfaa0600",
    );

    /// [`every_kind_of_write`] as journal format 1 wrote it.
    const FROZEN_LAYOUT_V1: &str = concat!(
        "01010800016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e7578031e000001016b",
        "00000196010000000081e2cfaa060081e2cfaa060081e2cfaa06000000000000010100000181e2cfaa060000000081e2",
        "cfaa060000000001016a0101710c7061796c6f6164206f66206a010764656661756c7401026f73056c696e7578031e00",
        "0001016b00000196010200000081e2cfaa060081e2cfaa060081e2cfaa060000000000000201010100020281e2cfaa06",
        "0000000081e2cfaa0600000000020161016e017001026f73056c696e757804010000013180e2cfaa060081e2cfaa0600",
        "00000000000000000000000000030170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa060080e2cf",
        "aa0600040170105468652064656661756c7420706f6f6c00a08d06000080e2cfaa060080e2cfaa060005017006016a01",
        "0201036f757483e2cfaa0600070d66656e63696e675f746f6b656e07",
    );

    #[test]
    fn a_torn_or_garbled_record_ends_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(dir.path()).expect("open");
        append(&mut journal, 1, "a");
        let second_at = journal.len();
        append(&mut journal, 2, "b");
        append(&mut journal, 3, "c");
        journal.sync().expect("sync");
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[second_at as usize + HEADER_BYTES + 3] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        let (_, records) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
        // A length that runs past the end of the file.
        bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let (_, records) = Journal::open(dir.path()).expect("reopen");
        assert!(records.is_empty());
    }

    #[test]
    fn only_records_after_the_database_are_replayed_and_a_gap_is_refused() {
        let records: Vec<RawRecord> = (5..=8).map(|seq| RawRecord { seq, payload: vec![FORMAT_V1] }).collect();
        let seqs = |r: Vec<RawRecord>| r.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(to_replay(records.clone(), 6).expect("replay")), [7, 8]);
        assert_eq!(seqs(to_replay(records.clone(), 4).expect("replay")), [5, 6, 7, 8]);
        assert!(to_replay(records.clone(), 8).expect("replay").is_empty());
        assert!(to_replay(records.clone(), 20).expect("replay").is_empty());
        let gap = to_replay(records, 2).expect_err("a gap");
        assert!(gap.to_string().contains("acknowledged writes are missing"), "{gap}");
    }

    #[test]
    fn a_record_of_a_newer_format_or_garbage_is_refused_by_name() {
        let newer = RawRecord { seq: 3, payload: vec![9, 1, 2] };
        assert!(newer.decode().expect_err("newer").to_string().contains("newer than this release"));
        let garbage = RawRecord { seq: 3, payload: vec![FORMAT_V1, 0xff, 0xff, 0xff] };
        assert!(matches!(garbage.decode(), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_group_larger_than_the_journal_is_not_written_and_a_full_one_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(dir.path()).expect("open");
        let mut big = conformance::job("big", 1, "q", None);
        big.spec.payload = vec![7u8; CHECKPOINT_BYTES as usize].into();
        let batch = vec![Write::create(big)];
        assert_eq!(journal.append(1, &[batch.as_slice()]).expect("append"), Appended::TooLarge);
        assert!(journal.is_empty());
        let mut half = conformance::job("half", 1, "q", None);
        half.spec.payload = vec![7u8; CHECKPOINT_BYTES as usize / 2 + 1].into();
        let batch = vec![Write::create(half)];
        assert_eq!(journal.append(1, &[batch.as_slice()]).expect("append"), Appended::Written);
        assert_eq!(journal.append(2, &[batch.as_slice()]).expect("append"), Appended::Full);
        journal.restart();
        assert_eq!(journal.append(2, &[batch.as_slice()]).expect("append"), Appended::Written);
    }
}
