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

pub struct SessionSecrets {
    key: Option<Arc<SecretsKey>>,
    engine: EngineHandle,
    /// Per job id: its masker, or `None` for a job without secrets.
    jobs: Mutex<HashMap<String, Option<Arc<Masker>>>>,
}

impl SessionSecrets {
    pub fn new(key: Option<Arc<SecretsKey>>, engine: EngineHandle) -> SessionSecrets {
        SessionSecrets { key, engine, jobs: Mutex::new(HashMap::new()) }
    }

    fn remember(&self, job_id: &str, masker: Option<Arc<Masker>>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if jobs.len() >= MAX_JOBS {
            jobs.clear();
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
    /// remembered for masking its output.
    pub async fn for_assignment(&self, job: &Job) -> BTreeMap<String, String> {
        let values = self.open(job).await;
        let masker = (!values.is_empty()).then(|| Arc::new(Masker::new(values.values().map(String::as_str))));
        self.remember(&job.id, masker);
        values
    }

    async fn open(&self, job: &Job) -> BTreeMap<String, String> {
        if job.spec.queue != DASHBOARD_QUEUE {
            return BTreeMap::new();
        }
        let Some(reference) = ShellCommand::from_payload(&job.spec.payload).secrets.map(|s| s.reference) else {
            return BTreeMap::new();
        };
        let Some(key) = &self.key else {
            tracing::error!(job = %job.id, "a job has secrets but this server has no secrets key; it runs without them");
            return BTreeMap::new();
        };
        let sealed = records::get::<Sealed>(self.engine.store().as_ref(), secrets::COLLECTION, &reference).await;
        let opened = match sealed {
            Ok(Some(sealed)) => key.open(&reference, &sealed.value).map_err(|e| e.to_string()),
            Ok(None) => Err("its sealed secrets are missing".to_string()),
            Err(e) => Err(e.to_string()),
        };
        opened.unwrap_or_else(|error| {
            tracing::error!(job = %job.id, %error, "a job's secrets could not be opened; it runs without them");
            BTreeMap::new()
        })
    }

    /// Masks the output messages of `batch` (and forgets finished jobs).
    pub async fn mask(&self, batch: &mut [AgentInbound]) {
        for message in batch {
            match message {
                AgentInbound::Log { job, data, .. } => {
                    let masker = match self.known(&job.job_id) {
                        Some(masker) => masker,
                        // Not assigned through this session (it resumed the
                        // job after a reconnect): opened once now.
                        None => match self.engine.get_job(&job.job_id).await {
                            Ok(stored) => {
                                let values = self.open(&stored).await;
                                let masker = (!values.is_empty())
                                    .then(|| Arc::new(Masker::new(values.values().map(String::as_str))));
                                self.remember(&job.job_id, masker.clone());
                                masker
                            }
                            // The engine refuses the message itself.
                            Err(_) => None,
                        },
                    };
                    if let Some(masker) = masker {
                        *data = Bytes::from(masker.mask(data));
                    }
                }
                AgentInbound::Finished { job, result, error, .. } => {
                    // Its result and error are stored and shown too.
                    if let Some(Some(masker)) = self.known(&job.job_id) {
                        *result = Bytes::from(masker.mask(result));
                        *error = String::from_utf8_lossy(&masker.mask(error.as_bytes())).into_owned();
                    }
                    self.forget(&job.job_id);
                }
                _ => {}
            }
        }
    }
}
