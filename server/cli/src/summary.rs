//! `tether summary`: the dashboard's front page (DashboardService.GetSummary).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tether::v1::{GetSummaryRequest, GetSummaryResponse};

use crate::args::OutputFormat;
use crate::client::Ctx;
use crate::output::{self, health_name, job_status_name, priority_name};

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let response = ctx.clients.dashboard.get_summary(ctx.clients.req(GetSummaryRequest {})).await?.into_inner();
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => write_summary(ctx.out, &response)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A wait as people read it: milliseconds under 10 s, then seconds.
fn short(d: Option<&prost_types::Duration>) -> String {
    let Some(d) = d.and_then(tether::time::from_duration) else { return "-".into() };
    let rounded = if d < Duration::from_secs(10) {
        Duration::from_millis(d.as_millis().min(u128::from(u64::MAX)) as u64)
    } else {
        Duration::from_secs(d.as_secs())
    };
    if rounded.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(rounded).to_string().replace(' ', "")
}

pub(crate) fn write_summary(out: &mut dyn Write, s: &GetSummaryResponse) -> std::io::Result<()> {
    let jobs: Vec<String> = s.jobs.iter().map(|j| format!("{} {}", job_status_name(j.status), j.count)).collect();
    writeln!(out, "jobs        {}", jobs.join("  "))?;
    match &s.last_24h {
        Some(w) => {
            let rate = w.success_rate.map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0));
            writeln!(
                out,
                "last 24h    {} succeeded, {} failed, {} cancelled (success {rate}); queue wait p50 {}, p95 {} over {} started",
                w.succeeded,
                w.failed,
                w.cancelled,
                short(w.queue_wait_p50.as_ref()),
                short(w.queue_wait_p95.as_ref()),
                w.started
            )?;
        }
        None => writeln!(out, "last 24h    -")?,
    }
    let queued: Vec<String> =
        s.queue_depth.iter().map(|p| format!("{} {}", priority_name(p.priority), p.count)).collect();
    writeln!(out, "queued      {}", queued.join("  "))?;
    let agents: Vec<String> =
        s.agents.iter().map(|a| format!("{} {}/{}", health_name(a.health), a.connected, a.total)).collect();
    let agents = if agents.is_empty() { "none".to_string() } else { agents.join("  ") };
    writeln!(out, "agents      {agents} (connected/all)")?;
    if s.services.is_empty() {
        return writeln!(out, "services    none deployed yet");
    }
    writeln!(
        out,
        "\n{:<24} {:>11} {:>11} {:>13} {:>13} {:>4}",
        "SERVICE", "DEPLOYS 24H", "DEPLOYS 30D", "MEAN RESTORE", "LAST RESTORE", "BAD"
    )?;
    for x in &s.services {
        writeln!(
            out,
            "{:<24} {:>11} {:>11} {:>13} {:>13} {:>4}",
            x.service,
            x.deployments_last_24h,
            x.deployments_last_30d,
            short(x.mean_time_to_restore.as_ref()),
            short(x.last_time_to_restore.as_ref()),
            x.bad_versions
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::v1::{JobStatus, JobStatusCount, JobWindow, ServiceSummary};

    #[test]
    fn the_summary_reads_as_lines_and_a_service_table() {
        let s = GetSummaryResponse {
            jobs: vec![JobStatusCount { status: JobStatus::Success as i32, count: 12 }],
            last_24h: Some(JobWindow {
                succeeded: 12,
                failed: 2,
                success_rate: Some(12.0 / 14.0),
                started: 14,
                queue_wait_p50: Some(prost_types::Duration { seconds: 1, nanos: 414_213_562 }),
                queue_wait_p95: Some(prost_types::Duration { seconds: 90, nanos: 500_000_000 }),
                ..Default::default()
            }),
            services: vec![ServiceSummary {
                service: "api".into(),
                deployments_last_24h: 3,
                deployments_last_30d: 40,
                mean_time_to_restore: Some(prost_types::Duration { seconds: 300, nanos: 0 }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut out = Vec::new();
        write_summary(&mut out, &s).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("jobs        success 12"), "{text}");
        assert!(text.contains("(success 85.7%); queue wait p50 1s414ms, p95 1m30s over 14 started"), "{text}");
        assert!(text.contains("agents      none"), "{text}");
        assert!(text.contains("api"), "{text}");
        assert!(text.contains("5m"), "{text}");
        let mut empty = Vec::new();
        write_summary(&mut empty, &GetSummaryResponse::default()).expect("write");
        assert!(String::from_utf8_lossy(&empty).contains("services    none deployed yet"));
    }
}
