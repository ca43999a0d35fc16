//! `tether agents …`: inspect and steer the fleet.

use std::process::ExitCode;
use std::time::SystemTime;

use tether::v1::{
    Agent, AgentSchedulingStatus, DeregisterAgentRequest, DrainAgentRequest, GetAgentRequest, ListAgentsRequest,
    ListAgentsResponse, UpdateAgentStatusRequest,
};

use crate::args::{AgentsCommand, ListAgentsArgs, OutputFormat};
use crate::client::{collect_pages, Ctx};
use crate::error::UsageError;
use crate::output::{self, ProtoName};
use crate::parse::labels_to_map;

/// Runs one `agents` subcommand.
pub(crate) async fn run(command: AgentsCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        AgentsCommand::List(args) => list(args, ctx).await?,
        AgentsCommand::Get { id } => {
            let response = ctx.clients.agents.get_agent(ctx.clients.req(GetAgentRequest { id })).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    let agent = response.agent.unwrap_or_default();
                    output::write_agent_details(ctx.out, &agent, SystemTime::now())?;
                }
            }
        }
        AgentsCommand::Drain { id, reason } => {
            let request = DrainAgentRequest { id, reason: reason.unwrap_or_default() };
            let response = ctx.clients.agents.drain_agent(ctx.clients.req(request)).await?.into_inner();
            print_change(ctx, &response, response.agent.as_ref(), |a| {
                format!("is draining: it finishes its {} running job(s) and takes no new ones", a.running_jobs.len())
            })?;
        }
        AgentsCommand::Cordon { id, reason } => {
            set_status(ctx, id, AgentSchedulingStatus::Cordoned, reason).await?;
        }
        AgentsCommand::Uncordon { id, reason } => {
            set_status(ctx, id, AgentSchedulingStatus::Active, reason).await?;
        }
        AgentsCommand::Deregister { id } => {
            let response =
                ctx.clients.agents.deregister_agent(ctx.clients.req(DeregisterAgentRequest { id })).await?.into_inner();
            print_change(ctx, &response, response.agent.as_ref(), |_| {
                "is deregistered; its running jobs are requeued".into()
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_status(
    ctx: &mut Ctx<'_>,
    id: String,
    status: AgentSchedulingStatus,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let request = UpdateAgentStatusRequest { id, scheduling_status: status as i32, reason: reason.unwrap_or_default() };
    let response = ctx.clients.agents.update_agent_status(ctx.clients.req(request)).await?.into_inner();
    print_change(ctx, &response, response.agent.as_ref(), |_| match status {
        AgentSchedulingStatus::Cordoned => "is cordoned: it takes no new jobs".into(),
        _ => "is active: it takes new jobs".into(),
    })
}

/// Prints the result of a change to an agent: the response in JSON, or one
/// sentence naming the agent and what now holds for it.
fn print_change<M: ProtoName>(
    ctx: &mut Ctx<'_>,
    response: &M,
    agent: Option<&Agent>,
    what: impl FnOnce(&Agent) -> String,
) -> anyhow::Result<()> {
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, response)?,
        OutputFormat::Table => {
            let default = Agent::default();
            let agent = agent.unwrap_or(&default);
            writeln!(ctx.out, "agent {} ({}) {}", agent.id, agent.name, what(agent))?;
        }
    }
    Ok(())
}

async fn list(args: ListAgentsArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let labels = labels_to_map(&args.labels).map_err(UsageError)?;
    let clients = ctx.clients.clone();
    let (agents, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(ListAgentsRequest {
            pool: args.pool.clone().unwrap_or_default(),
            health: args.health.iter().map(|h| *h as i32).collect(),
            labels: labels.clone(),
            page_size: args.page.limit.unwrap_or(0),
            page_token,
        });
        let mut client = clients.agents.clone();
        async move {
            let r = client.list_agents(request).await?.into_inner();
            Ok((r.agents, r.next_page_token))
        }
    })
    .await?;
    let response = ListAgentsResponse { agents, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            if response.agents.is_empty() {
                writeln!(ctx.err, "no agents found")?;
            } else {
                output::write_agents_table(ctx.out, &response.agents, SystemTime::now())?;
            }
            if !response.next_page_token.is_empty() {
                writeln!(ctx.err, "more agents: add --page-token {} (or use --all)", response.next_page_token)?;
            }
        }
    }
    Ok(())
}
