//! A replica's part in a cluster of replicas sharing one store: it
//! announces itself in the store's membership (renewed every `heartbeat`,
//! valid for three of them), keeps the list of live peers, and sends peers
//! wake-ups for jobs that became ready here with no free agent to take
//! them. A wake-up is a hint (the peer reads and claims conditionally;
//! its sweep finds what a lost wake-up missed), so failures are logged and
//! counted, never retried.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use tether::v1 as pb;
use tether::v1::replica_service_client::ReplicaServiceClient;

use crate::clock::Clock;
use crate::engine::PeerNotice;
use crate::store::membership::{Membership, Replica};

/// How a replica joins its cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    pub membership: Arc<dyn Membership>,
    /// This replica's id (unique per process start).
    pub replica_id: String,
    /// Where peers reach this replica's gRPC port (`http://host:port`).
    pub advertise: String,
    /// How often the announcement is renewed and the peer list re-read.
    pub heartbeat: Duration,
}

impl ClusterConfig {
    pub fn new(membership: Arc<dyn Membership>, advertise: String) -> ClusterConfig {
        ClusterConfig {
            membership,
            replica_id: uuid::Uuid::now_v7().to_string(),
            advertise,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// A live peer and a (lazily connected) client of it.
#[derive(Clone)]
struct Peer {
    id: String,
    address: String,
    client: ReplicaServiceClient<Channel>,
}

/// Wake-ups a peer gets at most in one request.
const WAKE_BATCH: usize = 1000;
/// How long a wake-up may take before it is given up.
const WAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the membership heartbeat and the waker until `stop`, then leaves
/// the membership.
pub fn spawn(
    config: ClusterConfig,
    clock: Arc<dyn Clock>,
    wakes: mpsc::UnboundedReceiver<PeerNotice>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let peers: Arc<RwLock<Vec<Peer>>> = Arc::default();
    let heartbeat = tokio::spawn(keep_membership(config.clone(), clock, peers.clone(), stop.clone()));
    let waker = tokio::spawn(send_wakes(config.replica_id.clone(), peers, wakes, stop));
    tokio::spawn(async move {
        let _ = waker.await;
        let _ = heartbeat.await;
        if let Err(e) = config.membership.leave(&config.replica_id).await {
            tracing::warn!(error = %e, "could not leave the cluster membership; peers drop it when it expires");
        }
    })
}

async fn keep_membership(
    config: ClusterConfig,
    clock: Arc<dyn Clock>,
    peers: Arc<RwLock<Vec<Peer>>>,
    stop: CancellationToken,
) {
    loop {
        let now = clock.now();
        let me = Replica {
            id: config.replica_id.clone(),
            address: config.advertise.clone(),
            expires: tether::time::later(now, config.heartbeat.saturating_mul(3)),
        };
        match config.membership.replicas().await {
            Ok(replicas) => {
                let live: Vec<Replica> =
                    replicas.into_iter().filter(|r| r.id != config.replica_id && r.expires > now).collect();
                let mut known = peers.write().unwrap_or_else(|e| e.into_inner());
                let next: Vec<Peer> = live
                    .into_iter()
                    .filter_map(|r| match known.iter().find(|p| p.id == r.id && p.address == r.address) {
                        Some(peer) => Some(peer.clone()),
                        None => connect(&r),
                    })
                    .collect();
                metrics::gauge!("tether_cluster_peers").set(next.len() as f64);
                *known = next;
            }
            Err(e) => tracing::warn!(error = %e, "reading the cluster membership failed; keeping the last peers"),
        }
        // Announced after the peers were read: a replica that is listed has
        // read the replicas announced before it.
        if let Err(e) = config.membership.announce(&me).await {
            tracing::warn!(error = %e, "announcing this replica failed; trying again");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = clock.sleep_until(tether::time::later(clock.now(), config.heartbeat)) => {}
        }
    }
}

fn connect(replica: &Replica) -> Option<Peer> {
    match Endpoint::from_shared(replica.address.clone()) {
        Ok(endpoint) => {
            let channel = endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).connect_lazy();
            Some(Peer {
                id: replica.id.clone(),
                address: replica.address.clone(),
                client: ReplicaServiceClient::new(channel),
            })
        }
        Err(e) => {
            tracing::warn!(peer = %replica.id, address = %replica.address, error = %e, "a peer announced an address that is not a URL");
            None
        }
    }
}

async fn send_wakes(
    me: String,
    peers: Arc<RwLock<Vec<Peer>>>,
    mut wakes: mpsc::UnboundedReceiver<PeerNotice>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            notice = wakes.recv() => match notice { Some(notice) => notice, None => return },
        };
        // Everything already waiting goes in the same request.
        let (mut jobs, mut agents) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(notice) = next.take() {
            match notice {
                PeerNotice::Job(job) => jobs.push(pb::WakeJob { id: job.id, pool: job.pool }),
                PeerNotice::Agent(id) => agents.push(id),
            }
            if jobs.len() < WAKE_BATCH && agents.len() < WAKE_BATCH {
                next = wakes.try_recv().ok();
            }
        }
        let targets = peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        for peer in targets {
            let request = pb::WakeRequest { replica_id: me.clone(), jobs: jobs.clone(), agents: agents.clone() };
            let mut client = peer.client.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(WAKE_TIMEOUT, client.wake(request)).await {
                    Ok(Ok(_)) => metrics::counter!("tether_cluster_wakes_sent_total").increment(1),
                    Ok(Err(status)) => {
                        metrics::counter!("tether_cluster_wakes_failed_total").increment(1);
                        tracing::debug!(peer = %peer.id, %status, "a wake-up was refused");
                    }
                    Err(_) => {
                        metrics::counter!("tether_cluster_wakes_failed_total").increment(1);
                        tracing::debug!(peer = %peer.id, "a wake-up timed out");
                    }
                }
            });
        }
    }
}
