//! `tether envs …`: create, replace and list the environments deployments
//! roll out to (DashboardService).

use std::process::ExitCode;
use std::time::SystemTime;

use tether::v1::{ListEnvironmentsRequest, PutEnvironmentRequest};

use crate::args::{EnvsCommand, OutputFormat, PutEnvironmentArgs};
use crate::client::Ctx;
use crate::output;

/// Runs one `envs` subcommand.
pub(crate) async fn run(command: EnvsCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        EnvsCommand::Put(args) => {
            let request = build_put_request(&args);
            let response = ctx.clients.dashboard.put_environment(ctx.clients.req(request)).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    let e = response.environment.clone().unwrap_or_default();
                    let what = if response.created { "created" } else { "replaced" };
                    let promote_to = if e.promote_to.is_empty() { "nowhere" } else { e.promote_to.as_str() };
                    let auto = if e.auto_rollback { "on" } else { "off" };
                    writeln!(
                        ctx.out,
                        "environment {} {what}: pool {}, promotes to {promote_to}, auto-rollback {auto}",
                        e.name, e.pool
                    )?;
                }
            }
        }
        EnvsCommand::List => {
            let response = ctx
                .clients
                .dashboard
                .list_environments(ctx.clients.req(ListEnvironmentsRequest {}))
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table if response.environments.is_empty() => {
                    writeln!(ctx.err, "no environments found; create one with `tether envs put NAME --pool POOL`")?
                }
                OutputFormat::Table => {
                    output::write_environments_table(ctx.out, &response.environments, SystemTime::now())?
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds the PutEnvironmentRequest from the flags: every setting is sent,
/// so a flag left out resets it (no promote-to, no auto-rollback).
pub(crate) fn build_put_request(args: &PutEnvironmentArgs) -> PutEnvironmentRequest {
    PutEnvironmentRequest {
        name: args.name.clone(),
        pool: args.pool.clone(),
        promote_to: args.promote_to.clone().unwrap_or_default(),
        auto_rollback: args.auto_rollback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_sends_every_setting() {
        let args = PutEnvironmentArgs {
            name: "staging".into(),
            pool: "linux".into(),
            promote_to: Some("production".into()),
            auto_rollback: true,
        };
        let r = build_put_request(&args);
        assert_eq!((r.name.as_str(), r.pool.as_str(), r.promote_to.as_str()), ("staging", "linux", "production"));
        assert!(r.auto_rollback);
        let r = build_put_request(&PutEnvironmentArgs { promote_to: None, auto_rollback: false, ..args });
        assert_eq!((r.promote_to.as_str(), r.auto_rollback), ("", false), "left out means reset");
    }
}
