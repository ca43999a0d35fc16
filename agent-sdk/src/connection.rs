//! One Connect stream, from Hello to its end: the handshake, heartbeats,
//! and the server's messages. Reconnecting is the caller's job.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tether::v1::agent_service_client::AgentServiceClient;
use tether::v1::{
    connect_request::Message as Out, connect_response::Message as In, Assignment, AssignmentAck, Heartbeat, Hello,
    JobRef, JobStarted, JobUpdateAck, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::Status;

use crate::config::AgentConfig;
use crate::error::{is_retryable, AgentError};
use crate::handler::{JobContext, JobHandler, JobSpec};
use crate::jobs::{AckEffect, CancelCause, JobKey};
use crate::runner::spawn_job;
use crate::state::{Outbound, Shared};

/// Used when Welcome carries no usable heartbeat interval.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Floor on the heartbeat interval, against a server sending a tiny one.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// How long a draining agent waits for the server to end the stream after
/// closing its side.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How a stream ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Drained and closed: the agent is done.
    Drained,
    /// The stream broke; reconnect. `welcomed` resets the backoff.
    Retry { welcomed: bool, reason: String },
    /// The server asked the agent to reconnect elsewhere (it is going
    /// away): move to the next server at once, jobs still running.
    Moved { reason: String },
    /// Give up with this error.
    Fatal(AgentError),
}

/// Everything one stream needs from its agent.
pub(crate) struct Session<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) handler: &'a Arc<dyn JobHandler>,
    pub(crate) config: &'a AgentConfig,
}

/// Clears the stream's sender and the connected flag however the session
/// ends, including by its future being dropped.
struct Connected<'a>(&'a Shared);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.core().set_stream(None);
        self.0.state.send_modify(|s| s.connected = false);
    }
}

impl Session<'_> {
    /// Runs one stream to `server` (the URL `client` dials) to its end.
    pub(crate) async fn run(&self, server: &str, mut client: AgentServiceClient<Channel>) -> SessionEnd {
        let (tx, rx) = mpsc::unbounded_channel::<Outbound>();
        let hello = self.hello();
        let running = hello.running_jobs.len();
        let _ =
            tx.send(Outbound { msg: tether::v1::ConnectRequest { message: Some(Out::Hello(hello)) }, _permit: None });
        // Dropping the Outbound here releases its output-budget permit once
        // the transport has pulled the message.
        let outbound = UnboundedReceiverStream::new(rx).map(|o: Outbound| o.msg);

        let handshake = async {
            let mut inbound = client.connect(outbound).await?.into_inner();
            let first = inbound.message().await?;
            Ok::<_, Status>((inbound, first))
        };
        let (mut inbound, first) = match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
            Err(_) => return retry(false, "no Welcome within the handshake timeout"),
            Ok(Err(status)) => return status_end(status, false),
            Ok(Ok(pair)) => pair,
        };
        let welcome = match first.and_then(|m| m.message) {
            Some(In::Welcome(w)) => w,
            None => return retry(false, "stream closed before Welcome"),
            Some(_) => return retry(false, "first server message was not a Welcome"),
        };
        if welcome.protocol_version != 0
            && !(tether::PROTOCOL_VERSION_MIN..=tether::PROTOCOL_VERSION_MAX).contains(&welcome.protocol_version)
        {
            return SessionEnd::Fatal(AgentError::Protocol(format!(
                "server chose protocol version {}, this agent speaks {}-{}",
                welcome.protocol_version,
                tether::PROTOCOL_VERSION_MIN,
                tether::PROTOCOL_VERSION_MAX
            )));
        }
        let heartbeat_every = welcome
            .heartbeat_interval
            .as_ref()
            .and_then(tether::time::from_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_HEARTBEAT)
            .max(MIN_HEARTBEAT);
        // Version 2: starts ride on the AssignmentAck and only refused ones
        // are answered.
        let lean = welcome.protocol_version >= tether::PROTOCOL_LEAN_STARTS;
        let _connected = self.install(server, &welcome, tx);
        tracing::info!(
            %server,
            agent_id = %welcome.agent_id,
            ?heartbeat_every,
            held_jobs = running,
            resumed = welcome.resumed_jobs.len(),
            abandoned = welcome.abandoned_jobs.len(),
            "connected"
        );
        self.serve(&mut inbound, heartbeat_every, lean).await
    }

    fn hello(&self) -> Hello {
        let c = self.config;
        Hello {
            credential: c.credential.clone().unwrap_or_default(),
            name: c.name.clone(),
            pool: c.pool.clone(),
            labels: c.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            slots: c.slots,
            version: c.version.clone(),
            min_protocol_version: tether::PROTOCOL_VERSION_MIN,
            max_protocol_version: tether::PROTOCOL_VERSION_MAX,
            running_jobs: self.shared.core().jobs.held_refs(),
        }
    }

    /// Applies the Welcome and makes this stream the one job tasks write to.
    fn install(&self, server: &str, welcome: &Welcome, tx: mpsc::UnboundedSender<Outbound>) -> Connected<'_> {
        let shared = self.shared.as_ref();
        {
            let mut core = shared.core();
            for job in &welcome.abandoned_jobs {
                if core.jobs.cancel(&JobKey::from_ref(job.clone()), CancelCause::Abandoned) {
                    tracing::info!(job_id = %job.job_id, attempt = job.attempt, "abandoning job");
                }
            }
            // Under the same lock as job completion: every result is either
            // in this re-send batch or sent on the new stream.
            let resend = core.jobs.new_stream();
            core.set_stream(Some(tx));
            for finished in resend {
                core.send(Out::JobFinished(finished));
            }
            shared.poke_if_idle(&core);
        }
        shared.state.send_modify(|s| {
            s.connected = true;
            s.agent_id = Some(welcome.agent_id.clone());
            s.server = Some(server.to_owned());
            s.sessions += 1;
        });
        Connected(shared)
    }

    /// The main loop of a welcomed stream.
    async fn serve(
        &self,
        inbound: &mut Streaming<tether::v1::ConnectResponse>,
        every: Duration,
        lean: bool,
    ) -> SessionEnd {
        let shared = self.shared;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_announced = false;
        loop {
            // Rare events first: polled after the inbound stream, the
            // heartbeat would starve under a steady flood of server messages,
            // and a starved heartbeat loses every lease.
            tokio::select! {
                biased;
                _ = ticker.tick() => self.heartbeat(),
                _ = shared.drain.cancelled(), if !drain_announced => {
                    drain_announced = true;
                    tracing::info!("draining: finishing running jobs, accepting no new ones");
                    self.heartbeat();
                    if shared.is_idle() {
                        return self.close(inbound).await;
                    }
                }
                _ = shared.idle.notified(), if drain_announced => {
                    if shared.is_idle() {
                        return self.close(inbound).await;
                    }
                }
                msg = inbound.next() => match msg {
                    Some(Ok(m)) => match m.message {
                        Some(In::Reconnect(r)) => {
                            tracing::info!(reason = %r.reason, "server asked to reconnect elsewhere");
                            return SessionEnd::Moved { reason: r.reason };
                        }
                        Some(m) => self.on_message(m, lean),
                        None => {}
                    },
                    Some(Err(status)) => return status_end(status, true),
                    None if shared.drain.is_cancelled() && shared.is_idle() => return SessionEnd::Drained,
                    None => return retry(true, "server closed the stream"),
                },
            }
        }
    }

    fn heartbeat(&self) {
        let core = self.shared.core();
        let running_jobs = core.jobs.running_refs();
        let metrics = Some(self.shared.metrics_now(running_jobs.len()));
        let draining = self.shared.drain.is_cancelled();
        core.send(Out::Heartbeat(Heartbeat { metrics, running_jobs, draining }));
    }

    fn on_message(&self, message: In, lean: bool) {
        match message {
            In::Assignment(a) => self.on_assignment(a, lean),
            In::Cancel(c) => {
                let Some(job) = c.job else { return };
                let found = self.shared.core().jobs.cancel(&JobKey::from_ref(job.clone()), CancelCause::Server);
                tracing::debug!(job_id = %job.job_id, found, reason = %c.reason, "cancel");
            }
            In::Drain(d) => {
                tracing::info!(reason = %d.reason, "server asked to drain");
                self.shared.request_drain();
            }
            In::JobUpdateAck(ack) => self.on_ack(ack),
            In::Welcome(_) => tracing::warn!("ignoring a second Welcome"),
            // Handled by the stream loop, which ends the stream.
            In::Reconnect(_) => {}
        }
    }

    fn on_ack(&self, ack: JobUpdateAck) {
        let Some(job) = ack.job else { return };
        if !ack.accepted {
            tracing::warn!(job_id = %job.job_id, attempt = job.attempt, reason = %ack.reason, "server refused a job update");
        }
        let key = JobKey::from_ref(job);
        let mut core = self.shared.core();
        match core.jobs.on_ack(&key, ack.accepted) {
            AckEffect::ResultSettled => self.shared.poke_if_idle(&core),
            AckEffect::StaleAbandoned | AckEffect::None => {}
        }
    }

    fn on_assignment(&self, a: Assignment, lean: bool) {
        let Some(job) = a.job else {
            tracing::warn!("ignoring an Assignment without a job reference");
            return;
        };
        let key = JobKey::from_ref(job.clone());
        let ack = |job: JobRef, accepted: bool, reason: &str| {
            Out::AssignmentAck(AssignmentAck { job: Some(job), accepted, reason: reason.into(), started: false })
        };
        let mut core = self.shared.core();
        // Re-sent assignments are idempotent: ack again, never run twice.
        if core.jobs.is_running(&key) {
            core.send(ack(job, true, "already running"));
            return;
        }
        if let Some(finished) = core.jobs.pending_result(&key).cloned() {
            core.send(ack(job, true, "already finished"));
            if core.send(Out::JobFinished(finished)) {
                core.jobs.expect_ack(&key);
            }
            return;
        }
        if self.shared.drain.is_cancelled() {
            core.send(ack(job, false, "agent is draining"));
            return;
        }
        if core.jobs.running_len() >= self.shared.slots as usize {
            core.send(ack(job, false, "no free slot"));
            return;
        }
        let token = tokio_util::sync::CancellationToken::new();
        core.jobs.insert_running(key.clone(), token.clone());
        if lean {
            // Only a refused start is answered; nothing to count.
            core.send(Out::AssignmentAck(AssignmentAck {
                job: Some(job.clone()),
                accepted: true,
                reason: String::new(),
                started: true,
            }));
        } else {
            core.send(ack(job.clone(), true, ""));
            if core.send(Out::JobStarted(JobStarted { job: Some(job.clone()) })) {
                core.jobs.expect_ack(&key);
            }
        }
        drop(core);
        let spec = JobSpec {
            job,
            queue: a.queue,
            payload: a.payload,
            priority: a.priority,
            timeout: a.timeout.as_ref().and_then(tether::time::from_duration).filter(|d| !d.is_zero()),
            max_attempts: a.max_attempts,
            secrets: a.secrets.into_iter().collect(),
        };
        let ctx = JobContext::new(spec, token, self.shared.clone());
        spawn_job(self.shared.clone(), self.handler.clone(), ctx, key);
    }

    /// Ends a drained stream: close our side, then give the server a moment
    /// to end its side so the last acks are not cut off.
    async fn close(&self, inbound: &mut Streaming<tether::v1::ConnectResponse>) -> SessionEnd {
        self.shared.core().set_stream(None);
        tracing::info!("drained; closing the stream");
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(In::JobUpdateAck(ack)) = m.message {
                    self.on_ack(ack);
                }
            }
        })
        .await;
        SessionEnd::Drained
    }
}

fn retry(welcomed: bool, reason: &str) -> SessionEnd {
    SessionEnd::Retry { welcomed, reason: reason.into() }
}

fn status_end(status: Status, welcomed: bool) -> SessionEnd {
    if is_retryable(status.code()) {
        SessionEnd::Retry { welcomed, reason: format!("{:?}: {}", status.code(), status.message()) }
    } else {
        SessionEnd::Fatal(AgentError::Rejected(status))
    }
}
