//! The secrets of the jobs one agent session runs: opened when an
//! Assignment is pushed (only that message carries them), and used to mask
//! the session's output of those jobs before the engine stores it (the
//! reference agent masks before sending; an agent that does not is masked
//! here, chunk by chunk).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tether::mask::Masker;

use crate::deploy::records;
use crate::domain::dashboard::{ShellCommand, DASHBOARD_QUEUE};
use crate::domain::Job;
use crate::engine::{AgentInbound, EngineHandle};
use crate::secrets::{self, Sealed, SecretsKey};

/// Jobs a session remembers at most; past it the memory starts over (a
/// forgotten job's secrets are opened again when its output comes).
const MAX_JOBS: usize = 4096;

/// Why a job cannot be given its secrets (it must not run without them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undeliverable {
    /// The sealed record cannot be opened (no key, missing, tampered).
    Unopenable(String),
    /// The session's protocol version predates secrets: another agent may
    /// take the job.
    AgentTooOld { protocol_version: u32 },
}

impl std::fmt::Display for Undeliverable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undeliverable::Unopenable(why) => write!(f, "its secrets could not be opened: {why}"),
            Undeliverable::AgentTooOld { protocol_version } => write!(
                f,
                "the agent speaks stream protocol version {protocol_version}, which does not carry secrets (version \
                 {} and later do): upgrade the agent",
                tether::PROTOCOL_SECRETS
            ),
        }
    }
}

pub struct SessionSecrets {
    key: Option<Arc<SecretsKey>>,
    engine: EngineHandle,
    /// The session's negotiated stream protocol version.
    protocol_version: u32,
    /// Per job id: its masker, or `None` for a job without secrets.
    jobs: Mutex<HashMap<String, Option<Arc<Masker>>>>,
}

/// Whether `job` is a dashboard job whose payload names sealed secrets.
fn has_secrets(job: &Job) -> bool {
    job.spec.queue == DASHBOARD_QUEUE
        && job.dashboard.is_some()
        && ShellCommand::from_payload(&job.spec.payload).secrets.is_some()
}

impl SessionSecrets {
    pub fn new(key: Option<Arc<SecretsKey>>, engine: EngineHandle, protocol_version: u32) -> SessionSecrets {
        SessionSecrets { key, engine, protocol_version, jobs: Mutex::new(HashMap::new()) }
    }

    fn remember(&self, job_id: &str, masker: Option<Arc<Masker>>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if jobs.len() >= MAX_JOBS {
            // One entry goes (it is opened again if its job still sends
            // output): jobs in flight keep theirs.
            if let Some(any) = jobs.keys().next().cloned() {
                jobs.remove(&any);
            }
        }
        jobs.insert(job_id.to_string(), masker);
    }

    fn known(&self, job_id: &str) -> Option<Option<Arc<Masker>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).get(job_id).cloned()
    }

    fn forget(&self, job_id: &str) {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).remove(job_id);
    }

    /// The secrets to put in `job`'s Assignment (empty for a job without),
    /// remembered for masking its output. `Err` says why a job with
    /// secrets cannot have them: it must not run without them.
    pub async fn for_assignment(&self, job: &Job) -> Result<BTreeMap<String, String>, Undeliverable> {
        // Before the record is read and opened: an old agent costs nothing.
        if self.protocol_version < tether::PROTOCOL_SECRETS && has_secrets(job) {
            return Err(Undeliverable::AgentTooOld { protocol_version: self.protocol_version });
        }
        let values = self.open(job).await.map_err(Undeliverable::Unopenable)?;
        self.remember(&job.id, masker_of(&values));
        Ok(values)
    }

    /// The job's secrets: only a dashboard job's (a job enqueued by hand
    /// cannot borrow another job's sealed record by naming it).
    async fn open(&self, job: &Job) -> Result<BTreeMap<String, String>, String> {
        if job.spec.queue != DASHBOARD_QUEUE || job.dashboard.is_none() {
            return Ok(BTreeMap::new());
        }
        let Some(reference) = ShellCommand::from_payload(&job.spec.payload).secrets.map(|s| s.reference) else {
            return Ok(BTreeMap::new());
        };
        let Some(key) = &self.key else {
            return Err("this server has no secrets key (--secrets-key-file)".to_string());
        };
        let sealed = records::get::<Sealed>(self.engine.store().as_ref(), secrets::COLLECTION, &reference).await;
        match sealed {
            Ok(Some(sealed)) => key.open(&reference, &sealed.value).map_err(|e| e.to_string()),
            Ok(None) => Err("its sealed secrets are missing".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The masker of a job this session may not have assigned (it resumed
    /// the job after a reconnect, or forgot it): opened once now.
    async fn masker(&self, job_id: &str) -> Option<Arc<Masker>> {
        if let Some(masker) = self.known(job_id) {
            return masker;
        }
        // A job the engine does not know is refused by the engine itself;
        // remembered, so an agent naming made-up jobs costs one look each.
        let Ok(stored) = self.engine.get_job(job_id).await else {
            self.remember(job_id, None);
            return None;
        };
        let masker = match self.open(&stored).await {
            Ok(values) => masker_of(&values),
            Err(error) => {
                // Its values never reached this agent through this server
                // (an assignment that cannot open them is failed instead).
                tracing::warn!(job = %job_id, %error, "cannot open a job's secrets to mask its output");
                None
            }
        };
        self.remember(job_id, masker.clone());
        masker
    }

    /// Masks what the agent reports of its jobs (output, progress, result,
    /// error, a rejection's reason) before the engine stores or logs it,
    /// and forgets finished jobs.
    pub async fn mask(&self, batch: &mut [AgentInbound]) {
        for message in batch {
            match message {
                AgentInbound::Log { job, data, .. } => {
                    if let Some(masker) = self.masker(&job.job_id).await {
                        *data = Bytes::from(masker.mask(data));
                    }
                }
                AgentInbound::Progress { job, message, .. } => {
                    if let Some(masker) = self.masker(&job.job_id).await {
                        *message = mask_text(&masker, message);
                    }
                }
                AgentInbound::AssignmentAck { job, reason, .. } => {
                    if let Some(masker) = self.masker(&job.job_id).await {
                        *reason = mask_text(&masker, reason);
                    }
                }
                AgentInbound::Finished { job, result, error, .. } => {
                    if let Some(masker) = self.masker(&job.job_id).await {
                        *result = Bytes::from(masker.mask(result));
                        *error = mask_text(&masker, error);
                    }
                    self.forget(&job.job_id);
                }
                _ => {}
            }
        }
    }
}

fn masker_of(values: &BTreeMap<String, String>) -> Option<Arc<Masker>> {
    let masker = Masker::new(values.values().map(String::as_str));
    (!masker.is_empty()).then(|| Arc::new(masker))
}

fn mask_text(masker: &Masker, text: &str) -> String {
    String::from_utf8_lossy(&masker.mask(text.as_bytes())).into_owned()
}
