//! What the activity log's entries say (`store::activity` keeps them as
//! bytes): an agent's change of health or scheduling, a deployment's change
//! of state. The engine and the deployments module write them with their
//! own writes; WatchEvents reads them back.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::domain::deploy::{Deployment, DeploymentEvent};
use crate::domain::{Agent, Health, SchedulingStatus};
use crate::store::codec::{decode, encode};
use crate::store::{Activity, ActivityKind, StoreResult};

/// An agent registered, or changed health or scheduling status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentChange {
    /// The agent after the change.
    pub agent: Agent,
    /// Its health and status before, as last logged; `None` when it was
    /// registered by this change.
    pub previous: Option<(Health, SchedulingStatus)>,
}

impl AgentChange {
    pub fn activity(&self, time: SystemTime) -> StoreResult<Activity> {
        Ok(Activity { kind: ActivityKind::Agent, subject: self.agent.id.clone(), time, body: encode(self)?.into() })
    }
}

/// One change of a deployment's state, with the deployment after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentChange {
    /// Without its audit trail (the change is `event`).
    pub deployment: Deployment,
    pub event: DeploymentEvent,
}

impl DeploymentChange {
    /// The entries of the events `deployment` gained since `before` (all of
    /// them for a new deployment), oldest first.
    pub fn entries(before: Option<&Deployment>, deployment: &Deployment) -> StoreResult<Vec<Activity>> {
        let new = match before.and_then(|b| b.events.last()) {
            // The trail drops its oldest changes past its cap, never its
            // newest: the last one read is still there. (Were it not, only
            // the newest change is logged: better one than repeats.)
            Some(last) => match deployment.events.iter().rposition(|e| e == last) {
                Some(i) => &deployment.events[i + 1..],
                None => &deployment.events[deployment.events.len().saturating_sub(1)..],
            },
            None => &deployment.events[..],
        };
        let bare = Deployment { events: Vec::new(), ..deployment.clone() };
        new.iter()
            .map(|event| {
                let change = DeploymentChange { deployment: bare.clone(), event: event.clone() };
                Ok(Activity {
                    kind: ActivityKind::Deployment,
                    subject: deployment.id.clone(),
                    time: event.time,
                    body: encode(&change)?.into(),
                })
            })
            .collect()
    }
}

/// An entry as its kind says.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Agent(Box<AgentChange>),
    Deployment(Box<DeploymentChange>),
}

impl Change {
    pub fn of(activity: &Activity) -> StoreResult<Change> {
        Ok(match activity.kind {
            ActivityKind::Agent => Change::Agent(decode(&activity.body)?),
            ActivityKind::Deployment => Change::Deployment(decode(&activity.body)?),
        })
    }
}
