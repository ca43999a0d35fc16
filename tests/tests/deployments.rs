//! Deployments end to end, through real agents (the reference shell
//! handler) in two pools: staging → production → rollback with the audit
//! trail checked event by event, promotion refused after a failed staging,
//! automatic rollback, two rollouts to one (service, environment) at once,
//! a rolled-back version never chosen again, and precise statuses for bad
//! input. Runs on either backend (`TETHER_TEST_STORE`).

use tether::v1 as pb;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether_agent_sdk::shell::ShellHandler;
use tether_agent_sdk::{Agent, AgentConfig, AgentHandle};
use tether_tests::{DataDir, Options, TestServer, WAIT};
use tonic::transport::Channel;
use tonic::Code;

use pb::DeploymentState as S;

type Dashboard = DashboardServiceClient<Channel>;

async fn spawn_agent(server: &TestServer, pool: &str) -> AgentHandle {
    let config = AgentConfig::new(server.url.clone(), format!("{pool}-runner")).with_pool(pool).with_slots(2);
    let agent = Agent::new(config, ShellHandler::default());
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    handle
}

async fn create_pool(server: &TestServer, name: &str) {
    server
        .agents()
        .await
        .create_agent_pool(pb::CreateAgentPoolRequest {
            pool: Some(pb::AgentPool { name: name.into(), ..Default::default() }),
        })
        .await
        .expect("create pool");
}

async fn put_env(d: &mut Dashboard, name: &str, pool: &str, promote_to: &str, auto_rollback: bool) -> pb::Environment {
    let req = pb::PutEnvironmentRequest {
        name: name.into(),
        pool: pool.into(),
        promote_to: promote_to.into(),
        auto_rollback,
    };
    d.put_environment(req).await.expect("put environment").into_inner().environment.expect("environment")
}

/// A server with pools and agents "staging" and "production", and their
/// environments (staging promotes to production).
async fn two_stages(dir: &DataDir) -> (TestServer, Dashboard, Vec<AgentHandle>) {
    let server = TestServer::start(dir, Options::default()).await;
    let mut agents = Vec::new();
    for pool in ["staging", "production"] {
        create_pool(&server, pool).await;
        agents.push(spawn_agent(&server, pool).await);
    }
    let mut d = server.dashboard().await;
    put_env(&mut d, "production", "production", "", false).await;
    put_env(&mut d, "staging", "staging", "production", false).await;
    (server, d, agents)
}

fn rollout(command: &str) -> Option<pb::RolloutSpec> {
    Some(pb::RolloutSpec { command: command.into(), ..Default::default() })
}

fn deploy(service: &str, version: &str, environment: &str, command: &str) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        service: service.into(),
        version: version.into(),
        environment: environment.into(),
        rollout: rollout(command),
        requested_by: "ann".into(),
        reason: format!("ship {version}"),
    }
}

async fn create(d: &mut Dashboard, req: pb::CreateDeploymentRequest) -> pb::Deployment {
    d.create_deployment(req).await.expect("create deployment").into_inner().deployment.expect("deployment")
}

async fn get(d: &mut Dashboard, id: &str) -> pb::Deployment {
    d.get_deployment(pb::GetDeploymentRequest { id: id.into() })
        .await
        .expect("get deployment")
        .into_inner()
        .deployment
        .expect("deployment")
}

fn state(d: &pb::Deployment) -> S {
    S::try_from(d.state).unwrap_or(S::Unspecified)
}

/// Polls GetDeployment until the deployment is in `want`.
async fn wait_state(d: &Dashboard, id: &str, want: S) -> pb::Deployment {
    tether_tests::wait_until(&format!("deployment {id} to be {want:?}"), || {
        let mut d = d.clone();
        let id = id.to_string();
        async move {
            d.get_deployment(pb::GetDeploymentRequest { id })
                .await
                .is_ok_and(|r| r.into_inner().deployment.is_some_and(|x| x.state == want as i32))
        }
    })
    .await;
    get(&mut d.clone(), id).await
}

async fn events(d: &mut Dashboard, service: &str, deployment_id: &str) -> Vec<pb::DeploymentEvent> {
    let req = pb::ListDeploymentEventsRequest {
        service: service.into(),
        deployment_id: deployment_id.into(),
        ..Default::default()
    };
    d.list_deployment_events(req).await.expect("events").into_inner().events
}

fn path(events: &[pb::DeploymentEvent]) -> Vec<(S, S)> {
    events
        .iter()
        .map(|e| {
            (S::try_from(e.from_state).unwrap_or(S::Unspecified), S::try_from(e.to_state).unwrap_or(S::Unspecified))
        })
        .collect()
}

const RAN: [(S, S); 4] =
    [(S::Unspecified, S::Pending), (S::Pending, S::Queued), (S::Queued, S::InProgress), (S::InProgress, S::Succeeded)];

#[tokio::test]
async fn staging_to_production_to_rollback_through_real_agents_with_the_audit_trail() {
    let dir = DataDir::new();
    let (_server, mut d, _agents) = two_stages(&dir).await;
    let command = "echo \"deploying $TETHER_DEPLOY_SERVICE@$TETHER_DEPLOY_VERSION to $TETHER_DEPLOY_ENVIRONMENT\"";

    let mut in_production = Vec::new();
    for version in ["v1", "v2"] {
        let staged = create(&mut d, deploy("api", version, "staging", command)).await;
        assert_eq!(staged.id.split_once('/').map(|(s, _)| s), Some("api"), "ids name their service");
        assert_eq!(staged.trigger, pb::DeploymentTrigger::Create as i32);
        let staged = wait_state(&d, &staged.id, S::Succeeded).await;
        let job = d.get_job(pb::GetJobRequest { id: staged.job_id.clone() }).await.expect("rollout job").into_inner();
        let job = job.job.expect("job");
        assert_eq!(job.routing.as_ref().map(|r| r.pool.as_str()), Some("staging"), "ran in the staging pool");
        assert_eq!(job.name, format!("deploy api@{version} to staging"));

        let promoted = d
            .promote_deployment(pb::PromoteDeploymentRequest {
                id: staged.id.clone(),
                reason: String::new(),
                requested_by: "bob".into(),
            })
            .await
            .expect("promote")
            .into_inner()
            .deployment
            .expect("deployment");
        assert_eq!((promoted.environment.as_str(), promoted.version.as_str()), ("production", version));
        assert_eq!(
            (promoted.trigger, promoted.promoted_from.as_str()),
            (pb::DeploymentTrigger::Promote as i32, staged.id.as_str())
        );
        let promoted = wait_state(&d, &promoted.id, S::Succeeded).await;
        let trail = events(&mut d, "api", &promoted.id).await;
        assert_eq!(path(&trail), RAN, "every change of the promoted deployment, in order");
        assert_eq!(trail[0].actor, "user:bob");
        assert!(trail[1..].iter().all(|e| e.actor == "tether"), "the server followed the rollout job");
        assert!(trail[1..].iter().all(|e| e.job_id == promoted.job_id), "each names the rollout job");
        assert!(trail.iter().all(|e| e.version == version && e.environment == "production"));
        in_production.push(promoted);
    }

    let rolled = d
        .rollback_deployment(pb::RollbackDeploymentRequest {
            service: "api".into(),
            environment: "production".into(),
            version: String::new(),
            reason: "error rate".into(),
            requested_by: "carol".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(rolled.rolled_back_version, "v2");
    let back = rolled.deployment.expect("deployment");
    assert_eq!((back.version.as_str(), back.environment.as_str()), ("v1", "production"));
    assert_eq!(
        (back.trigger, back.rollback_of.as_str()),
        (pb::DeploymentTrigger::Rollback as i32, in_production[1].id.as_str())
    );
    wait_state(&d, &back.id, S::Succeeded).await;
    let v2 = get(&mut d, &in_production[1].id).await;
    assert_eq!(state(&v2), S::RolledBack);
    let last = events(&mut d, "api", &v2.id).await;
    let last = last.last().expect("an event");
    assert_eq!((last.actor.as_str(), last.reason.as_str()), ("user:carol", "error rate"));

    // v2 is bad now: no deployment, promotion or rollback picks it again.
    let refused = d.create_deployment(deploy("api", "v2", "production", command)).await.expect_err("bad version");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let staged_v2 = d
        .list_deployments(pb::ListDeploymentsRequest {
            service: "api".into(),
            environment: "staging".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .deployments;
    assert_eq!(staged_v2.iter().map(|x| x.version.as_str()).collect::<Vec<_>>(), ["v2", "v1"], "newest first");
    let refused = d
        .promote_deployment(pb::PromoteDeploymentRequest { id: staged_v2[0].id.clone(), ..Default::default() })
        .await
        .expect_err("bad version");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Production now runs v1, and only v2 (bad) succeeded there besides.
    let refused = d
        .rollback_deployment(pb::RollbackDeploymentRequest {
            service: "api".into(),
            environment: "production".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing left to roll back to");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The whole service's trail: every deployment's events, newest first.
    let all = d
        .list_deployment_events(pb::ListDeploymentEventsRequest { service: "api".into(), ..Default::default() })
        .await
        .expect("events")
        .into_inner()
        .events;
    assert_eq!(all.first().map(|e| e.deployment_id.as_str()), Some(back.id.as_str()));
    assert_eq!(all.iter().filter(|e| e.from_state == S::Unspecified as i32).count(), 5, "five deployments");
}

#[tokio::test]
async fn promotion_is_refused_after_a_failed_staging_and_auto_rollback_restores_the_good_version() {
    let dir = DataDir::new();
    let (_server, mut d, _agents) = two_stages(&dir).await;
    let good = create(&mut d, deploy("web", "v1", "staging", "true")).await;
    wait_state(&d, &good.id, S::Succeeded).await;

    let failed = create(&mut d, deploy("web", "v2", "staging", "echo broken; exit 3")).await;
    let failed = wait_state(&d, &failed.id, S::Failed).await;
    assert!(failed.error.contains("failed"), "{}", failed.error);
    let refused = d
        .promote_deployment(pb::PromoteDeploymentRequest { id: failed.id.clone(), ..Default::default() })
        .await
        .expect_err("failed staging");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("only a succeeded deployment"), "{}", refused.message());
    let path_of_failed = path(&events(&mut d, "web", &failed.id).await);
    assert_eq!(path_of_failed.last(), Some(&(S::InProgress, S::Failed)));

    // Where auto-rollback is on, a failed rollout deploys the last good
    // version again.
    put_env(&mut d, "canary", "staging", "", true).await;
    let good = create(&mut d, deploy("web", "v1", "canary", "true")).await;
    wait_state(&d, &good.id, S::Succeeded).await;
    let failed = create(&mut d, deploy("web", "v3", "canary", "exit 4")).await;
    let failed = wait_state(&d, &failed.id, S::RolledBack).await;
    let listed = d
        .list_deployments(pb::ListDeploymentsRequest {
            service: "web".into(),
            environment: "canary".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .deployments;
    let back = listed.first().expect("the rollback deployment");
    assert_eq!((back.version.as_str(), back.trigger), ("v1", pb::DeploymentTrigger::AutoRollback as i32));
    assert_eq!(back.rollback_of, failed.id);
    let back = wait_state(&d, &back.id, S::Succeeded).await;
    let trail = events(&mut d, "web", &back.id).await;
    assert_eq!(path(&trail), RAN);
    assert!(trail.iter().all(|e| e.actor == "tether"), "the server rolled back: {trail:?}");
    let refused = d.create_deployment(deploy("web", "v3", "staging", "exit 4")).await.expect_err("v3 is bad");
    assert!(refused.message().contains("marked bad"), "{}", refused.message());
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn one_rollout_at_a_time_per_service_and_environment_and_the_newest_waiting_one_wins() {
    let dir = DataDir::new();
    let (_server, mut d, _agents) = two_stages(&dir).await;
    let gate = tempfile::tempdir().expect("tempdir");
    let open = gate.path().join("open");
    // The first rollout runs until the test opens the gate.
    let held = format!("while [ ! -e '{}' ]; do sleep 0.02; done", open.display());
    let first = create(&mut d, deploy("db", "v1", "staging", &held)).await;
    wait_state(&d, &first.id, S::InProgress).await;
    let second = create(&mut d, deploy("db", "v2", "staging", "true")).await;
    assert_eq!(state(&second), S::Pending, "waits for the rollout in progress");
    let third = create(&mut d, deploy("db", "v3", "staging", "true")).await;
    assert_eq!(state(&third), S::Pending);
    let second = get(&mut d, &second.id).await;
    assert_eq!(state(&second), S::Superseded, "the newer waiting deployment replaced it");
    assert!(second.job_id.is_empty(), "it never ran");
    assert!(second.error.contains(&third.id), "{}", second.error);
    // Another service in the same environment is not held up.
    let other = create(&mut d, deploy("cache", "v1", "staging", "true")).await;
    wait_state(&d, &other.id, S::Succeeded).await;
    assert_eq!(state(&get(&mut d, &third.id).await), S::Pending);

    std::fs::write(&open, b"").expect("open the gate");
    wait_state(&d, &first.id, S::Succeeded).await;
    wait_state(&d, &third.id, S::Succeeded).await;
    assert_eq!(
        path(&events(&mut d, "db", &second.id).await),
        [(S::Unspecified, S::Pending), (S::Pending, S::Superseded)]
    );
}

#[tokio::test]
async fn bad_deployment_requests_get_precise_statuses() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    let code =
        |r: Result<tonic::Response<pb::PutEnvironmentResponse>, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());
    let env = |name: &str, pool: &str, promote_to: &str| pb::PutEnvironmentRequest {
        name: name.into(),
        pool: pool.into(),
        promote_to: promote_to.into(),
        auto_rollback: false,
    };
    assert_eq!(code(d.put_environment(env("qa", "nowhere", "")).await), Err(Code::NotFound), "unknown pool");
    assert_eq!(code(d.put_environment(env("qa", "default", "qa")).await), Err(Code::FailedPrecondition), "itself");
    assert_eq!(code(d.put_environment(env("qa", "default", "prod")).await), Err(Code::NotFound), "unknown next");
    assert_eq!(code(d.put_environment(env("prod", "default", "")).await), Ok(()));
    assert_eq!(code(d.put_environment(env("qa", "default", "prod")).await), Ok(()));
    assert_eq!(code(d.put_environment(env("prod", "default", "qa")).await), Err(Code::FailedPrecondition), "a cycle");
    let listed = d.list_environments(pb::ListEnvironmentsRequest {}).await.expect("list").into_inner().environments;
    let names: Vec<_> = listed.iter().map(|e| (e.name.as_str(), e.promote_to.as_str())).collect();
    assert_eq!(names, [("prod", ""), ("qa", "prod")]);

    let refused = d.create_deployment(deploy("api", "v1", "mars", "true")).await.expect_err("unknown environment");
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("mars"), "{}", refused.message());
    for (field, req) in [
        ("service", deploy("", "v1", "qa", "true")),
        ("version", deploy("api", "v 1", "qa", "true")),
        (
            "rollout.timeout",
            pb::CreateDeploymentRequest {
                rollout: Some(pb::RolloutSpec {
                    command: "true".into(),
                    timeout: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
                    ..Default::default()
                }),
                ..deploy("api", "v1", "qa", "true")
            },
        ),
    ] {
        let refused = d.create_deployment(req).await.expect_err(field);
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}: {refused:?}");
        assert_eq!(tether_tests::violated_fields(&refused), [field.to_string()], "{field}");
    }
    let refused = d.create_deployment(deploy("api", "v1", "qa", "")).await.expect_err("no release, no spec");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("rollout.command"), "{}", refused.message());
    // No agent runs it: it stays queued, which is enough to store the release.
    let first = create(&mut d, deploy("api", "v1", "qa", "true")).await;
    assert_eq!(state(&first), S::Queued);
    let refused = d.create_deployment(deploy("api", "v1", "prod", "false")).await.expect_err("another spec");
    assert_eq!(refused.code(), Code::AlreadyExists, "a release never changes");
    let again = create(&mut d, pb::CreateDeploymentRequest { rollout: None, ..deploy("api", "v1", "prod", "") }).await;
    assert_eq!(again.rollout.map(|r| r.command), Some("true".to_string()), "the stored release");
    let long = "x".repeat(300);
    for (id, want) in [
        ("", Code::InvalidArgument),
        ("api", Code::NotFound),
        ("api/", Code::NotFound),
        ("nope/123", Code::NotFound),
        (long.as_str(), Code::InvalidArgument),
    ] {
        let status = d.get_deployment(pb::GetDeploymentRequest { id: id.into() }).await.expect_err(id).code();
        assert_eq!(status, want, "{id}");
    }
    // A spec with fields but no command is compared with the stored one,
    // not dropped.
    let partial = pb::CreateDeploymentRequest {
        rollout: Some(pb::RolloutSpec { max_attempts: 7, ..Default::default() }),
        ..deploy("api", "v1", "prod", "")
    };
    let refused = d.create_deployment(partial).await.expect_err("another spec");
    assert_eq!(refused.code(), Code::AlreadyExists);
    let refused = d
        .rollback_deployment(pb::RollbackDeploymentRequest {
            service: "api".into(),
            environment: "qa".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing succeeded");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let refused = d
        .promote_deployment(pb::PromoteDeploymentRequest { id: first.id.clone(), ..Default::default() })
        .await
        .expect_err("still queued");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let refused = d
        .list_deployment_events(pb::ListDeploymentEventsRequest {
            service: "web".into(),
            deployment_id: first.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("another service's deployment");
    assert_eq!(refused.code(), Code::NotFound);
    let refused = d
        .list_deployments(pb::ListDeploymentsRequest {
            service: "api".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("foreign token");
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn deployment_listings_page_without_skips_or_repeats() {
    let dir = DataDir::new();
    let server = TestServer::start_manual(&dir).await;
    let mut d = server.dashboard().await;
    put_env(&mut d, "a", "default", "", false).await;
    put_env(&mut d, "b", "default", "", false).await;
    let mut made = Vec::new();
    for i in 0..12 {
        let env = if i % 3 == 0 { "a" } else { "b" };
        made.push((create(&mut d, deploy("svc", &format!("v{i}"), env, "true")).await.id, env));
    }
    for (filter, page_size) in [("", 5), ("a", 2), ("b", 3)] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = d
                .list_deployments(pb::ListDeploymentsRequest {
                    service: "svc".into(),
                    environment: filter.into(),
                    page_size,
                    page_token: token,
                })
                .await
                .expect("list")
                .into_inner();
            assert!(page.deployments.len() <= page_size as usize);
            seen.extend(page.deployments.into_iter().map(|x| x.id));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let want: Vec<String> =
            made.iter().rev().filter(|(_, e)| filter.is_empty() || *e == filter).map(|(id, _)| id.clone()).collect();
        assert_eq!(seen, want, "filter {filter:?}: newest first, each once");
    }
}

/// Polls GetSummary until `done` holds for it.
async fn wait_summary(
    d: &Dashboard,
    what: &str,
    done: impl Fn(&pb::GetSummaryResponse) -> bool,
) -> pb::GetSummaryResponse {
    let done = &done;
    tether_tests::wait_until(what, || {
        let mut d = d.clone();
        async move { d.get_summary(pb::GetSummaryRequest {}).await.is_ok_and(|r| done(r.get_ref())) }
    })
    .await;
    d.clone().get_summary(pb::GetSummaryRequest {}).await.expect("summary").into_inner()
}

#[tokio::test]
async fn the_summary_counts_deployments_restores_and_the_last_day_of_jobs() {
    let dir = DataDir::new();
    let (_server, mut d, _agents) = two_stages(&dir).await;
    put_env(&mut d, "canary", "staging", "", false).await;
    let ok = create(&mut d, deploy("shop", "v1", "canary", "true")).await;
    wait_state(&d, &ok.id, S::Succeeded).await;
    let broken = create(&mut d, deploy("shop", "v2", "canary", "exit 1")).await;
    wait_state(&d, &broken.id, S::Failed).await;
    let fixed = create(&mut d, deploy("shop", "v3", "canary", "true")).await;
    wait_state(&d, &fixed.id, S::Succeeded).await;

    let summary = wait_summary(&d, "the summary to count the restore and the jobs", |s| {
        let shop = s.services.iter().find(|x| x.service == "shop");
        shop.is_some_and(|x| x.restores == 1 && x.deployments_last_24h == 2)
            && s.last_24h.as_ref().is_some_and(|w| w.succeeded == 2 && w.failed == 1 && w.started == 3)
    })
    .await;
    let shop = summary.services.iter().find(|x| x.service == "shop").expect("shop");
    assert_eq!(shop.deployments_last_30d, 2);
    assert!(shop.mean_time_to_restore.is_some() && shop.last_time_to_restore.is_some());
    assert_eq!(shop.bad_versions, 0);
    let day = summary.last_24h.expect("window");
    assert_eq!(day.success_rate, Some(2.0 / 3.0));
    assert!(day.queue_wait_p50.is_some() && day.queue_wait_p95.is_some());
    let by_status = |status: pb::JobStatus| summary.jobs.iter().find(|j| j.status == status as i32).map(|j| j.count);
    assert_eq!(by_status(pb::JobStatus::Success), Some(2), "the rollout jobs, by status");
    assert_eq!(by_status(pb::JobStatus::Failed), Some(1));
    assert_eq!(by_status(pb::JobStatus::Pending), Some(0));
    // Whatever their health (a loaded machine makes them report pressure).
    let connected: u64 = summary.agents.iter().map(|a| a.connected).sum();
    assert_eq!(connected, 2, "both agents are connected: {:?}", summary.agents);
    assert!(summary.agents.iter().all(|a| a.connected <= a.total));
    assert_eq!(summary.queue_depth.len(), 4, "every priority, zeros included");
    assert!(summary.queue_depth.iter().all(|p| p.count == 0));
}
