//! Turns failures into what an operator reads: `error: <CODE>: <message>`
//! and a hint on what to do next.
//!
//! The hint depends on what the command was about (a job, an agent, a
//! pool, a deployment or an environment), so a NOT_FOUND points at the listing command that shows valid ids.

use std::fmt::Write as _;

use tonic::{Code, Status};

/// A mistake in how the CLI was called that clap could not catch (a bad
/// `--server` URL, conflicting labels). Reported like clap's own usage
/// errors, with exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// What a command acted on; picks the wording of hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A queued job (`tether queue …`).
    Job,
    /// A dashboard job (`tether jobs …`).
    DashboardJob,
    /// An agent (`tether agents …`).
    Agent,
    /// An agent pool (`tether pools …`).
    Pool,
    /// A deployment (`tether deploy …`).
    Deployment,
    /// An environment (`tether envs …`).
    Environment,
}

/// Where and on what a command failed, for [`hint`].
#[derive(Debug, Clone)]
pub struct ErrorContext {
    /// The server address the command talked to.
    pub server: String,
    /// What the command acted on.
    pub subject: Subject,
}

/// The canonical upper-case name of a gRPC code (as in the gRPC spec and the
/// proto docs), e.g. `NOT_FOUND`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What the operator can do about a status with this code, if anything
/// useful can be said.
pub fn hint(code: Code, ctx: &ErrorContext) -> Option<String> {
    let (noun, list_cmd, get_cmd) = match ctx.subject {
        Subject::Job => ("job", "tether queue list", "tether queue get ID"),
        Subject::DashboardJob => ("job", "tether jobs list", "tether jobs get ID"),
        Subject::Agent => ("agent", "tether agents list", "tether agents get ID"),
        Subject::Pool => ("pool", "tether pools list", "tether pools get NAME"),
        Subject::Deployment => ("deployment", "tether deploy list SERVICE", "tether deploy get ID"),
        Subject::Environment => ("environment", "tether envs list", "tether envs list"),
    };
    let server = &ctx.server;
    let text = match code {
        Code::Unavailable => format!(
            "is the server running at {server}? start it with `tether server`, \
             or point the CLI elsewhere with --server or TETHER_SERVER"
        ),
        Code::NotFound if ctx.subject == Subject::Pool => format!("list pools with `{list_cmd}`"),
        // The deployment, or the environment a deployment names.
        Code::NotFound if ctx.subject == Subject::Deployment => {
            format!("check the deployment id with `{list_cmd}` and the environment with `tether envs list`")
        }
        // The environment's pool or its promote-to environment.
        Code::NotFound if ctx.subject == Subject::Environment => {
            "the pool (`tether pools list`) and the --promote-to environment (`tether envs list`) must exist"
                .to_string()
        }
        Code::NotFound => format!("check the {noun} id with `{list_cmd}`"),
        // The only pool call refused this way is a delete: the pool still
        // has agents or queued jobs, or it is the default pool.
        Code::FailedPrecondition if ctx.subject == Subject::Pool => {
            "only a pool without live agents or queued jobs can be deleted (never the default pool): \
             drain and deregister its agents first (`tether agents list --pool NAME`, then \
             `tether agents deregister ID`) and cancel the jobs waiting for it"
                .to_string()
        }
        // Cancel refuses an ended job, retry one that has not ended.
        Code::FailedPrecondition if ctx.subject == Subject::DashboardJob => format!(
            "only a pending or running job can be cancelled, and only an ended one retried; \
             see its status with `{get_cmd}`"
        ),
        // Promote needs a succeeded deployment and a promote-to
        // environment, rollback a good version to go back to, a new version
        // its rollout, and no deployment may use a version a rollback
        // marked bad.
        Code::FailedPrecondition if ctx.subject == Subject::Deployment => format!(
            "see the service's deployments with `{list_cmd}` and what happened to them with \
             `tether deploy history SERVICE`; a version's first deployment needs --command or --script-file"
        ),
        Code::FailedPrecondition if ctx.subject == Subject::Environment => {
            "an environment may not promote to itself, nor along a chain back to itself; \
             see the chain with `tether envs list`"
                .to_string()
        }
        Code::FailedPrecondition => {
            format!("the {noun} is not in a state that allows this; see its state with `{get_cmd}`")
        }
        Code::AlreadyExists => match ctx.subject {
            Subject::Job | Subject::DashboardJob => "this idempotency key was already used for a different job; \
                             use a new --idempotency-key or drop it"
                .to_string(),
            Subject::Agent => "an agent with that name already exists in the pool".to_string(),
            Subject::Pool => "a pool with that name already exists; change it with `tether pools update`".to_string(),
            Subject::Deployment => "this version was released with a different rollout; deploy a new version, \
                                    or leave --command and --script-file out to run the stored one"
                .to_string(),
            Subject::Environment => {
                "an environment with that name already exists; `tether envs put` replaces it".to_string()
            }
        },
        Code::InvalidArgument | Code::OutOfRange => {
            "the server refused a value; check the flags with `--help`".to_string()
        }
        Code::Unauthenticated => "pass a credential with --token or the TETHER_TOKEN \
                                  environment variable"
            .to_string(),
        Code::PermissionDenied => "your credential's role does not allow this; \
                                   ask an admin for an operator or admin token"
            .to_string(),
        Code::ResourceExhausted => "a rate or size limit was hit; wait a moment and retry, or send less".to_string(),
        Code::DeadlineExceeded => "the server did not answer in time; retry, and check its load and logs".to_string(),
        Code::Unimplemented => {
            format!("the server at {server} does not offer this call; is it an older Tether version?")
        }
        Code::Aborted => "the request conflicted with a concurrent change; retry".to_string(),
        Code::Internal | Code::Unknown | Code::DataLoss => {
            format!("this looks like a server bug; check the logs of the server at {server}")
        }
        Code::Ok | Code::Cancelled => return None,
    };
    Some(text)
}

/// Renders a gRPC status the way the CLI prints it: `error: <CODE>:
/// <message>` and, when there is one, a `hint:` line.
pub fn render_status(status: &Status, ctx: &ErrorContext) -> String {
    let mut message = status.message().to_string();
    // Transport failures (connection refused, DNS, TLS) come back as a
    // status whose message is generic and whose cause is in the source
    // chain; show the cause, it is what the operator can act on.
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !message.contains(&text) {
            if message.is_empty() {
                message = text;
            } else {
                let _ = write!(message, ": {text}");
            }
        }
        source = err.source();
    }
    if message.is_empty() {
        message = "(no message)".to_string();
    }
    let mut out = format!("error: {}: {message}", code_name(status.code()));
    if let Some(h) = hint(status.code(), ctx) {
        let _ = write!(out, "\nhint: {h}");
    }
    out
}

/// Renders any error the CLI may end with. A gRPC status anywhere in the
/// chain gets [`render_status`]; anything else (a file that cannot be read,
/// a bad server URL) prints its full context chain.
pub fn render_error(err: &anyhow::Error, ctx: &ErrorContext) -> String {
    match err.chain().find_map(|e| e.downcast_ref::<Status>()) {
        Some(status) => {
            let rendered = render_status(status, ctx);
            // Keep context added above the status (e.g. "waiting for job X").
            // (anyhow's own downcast looks through context, so test the
            // outermost link of the chain instead.)
            let outer = err.to_string();
            let outermost_is_status = err.chain().next().is_some_and(|e| e.downcast_ref::<Status>().is_some());
            if outermost_is_status || outer.is_empty() {
                rendered
            } else {
                format!("{rendered}\n(while {outer})")
            }
        }
        None => format!("error: {err:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(subject: Subject) -> ErrorContext {
        ErrorContext { server: "http://127.0.0.1:50051".into(), subject }
    }

    #[test]
    fn unavailable_names_the_server_and_how_to_start_it() {
        let s = Status::unavailable("tcp connect error");
        let text = render_status(&s, &ctx(Subject::Job));
        assert!(text.starts_with("error: UNAVAILABLE: tcp connect error\n"), "{text}");
        assert!(text.contains("http://127.0.0.1:50051"), "{text}");
        assert!(text.contains("`tether server`"), "{text}");
    }

    #[test]
    fn not_found_points_at_the_right_list_command() {
        let s = Status::not_found("job 42 not found");
        let job = render_status(&s, &ctx(Subject::Job));
        assert_eq!(job, "error: NOT_FOUND: job 42 not found\nhint: check the job id with `tether queue list`");
        let agent = render_status(&s, &ctx(Subject::Agent));
        assert!(agent.contains("`tether agents list`"), "{agent}");
    }

    #[test]
    fn every_failure_code_has_a_hint() {
        for code in [
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            for subject in [
                Subject::Job,
                Subject::DashboardJob,
                Subject::Agent,
                Subject::Pool,
                Subject::Deployment,
                Subject::Environment,
            ] {
                assert!(hint(code, &ctx(subject)).is_some(), "{code:?}");
            }
        }
        assert_eq!(hint(Code::Cancelled, &ctx(Subject::Job)), None);
    }

    #[test]
    fn pool_hints_name_the_pool_commands() {
        let text = render_status(&Status::not_found("pool \"gpu\" not found"), &ctx(Subject::Pool));
        assert_eq!(text, "error: NOT_FOUND: pool \"gpu\" not found\nhint: list pools with `tether pools list`");
        let text = render_status(&Status::failed_precondition("pool has 2 live agent(s)"), &ctx(Subject::Pool));
        assert!(text.contains("deregister its agents first"), "{text}");
        let text = render_status(&Status::already_exists("pool exists"), &ctx(Subject::Pool));
        assert!(text.contains("`tether pools update`"), "{text}");
        // Other subjects keep their wording.
        let text = render_status(&Status::failed_precondition("terminated"), &ctx(Subject::Agent));
        assert!(text.contains("`tether agents get ID`"), "{text}");
    }

    #[test]
    fn dashboard_job_hints_name_the_jobs_commands() {
        let text = render_status(&Status::not_found("job \"j\" not found"), &ctx(Subject::DashboardJob));
        assert_eq!(text, "error: NOT_FOUND: job \"j\" not found\nhint: check the job id with `tether jobs list`");
        let text = render_status(&Status::failed_precondition("job j has ended"), &ctx(Subject::DashboardJob));
        assert!(text.starts_with("error: FAILED_PRECONDITION: job j has ended\nhint: "), "{text}");
        assert!(text.contains("`tether jobs get ID`"), "{text}");
        let text = render_status(&Status::already_exists("key reused"), &ctx(Subject::DashboardJob));
        assert!(text.contains("--idempotency-key"), "{text}");
    }

    #[test]
    fn deployment_hints_name_the_deploy_commands() {
        let text = render_status(
            &Status::failed_precondition("nothing has succeeded in production yet: nothing to roll back"),
            &ctx(Subject::Deployment),
        );
        assert!(text.starts_with("error: FAILED_PRECONDITION: nothing has succeeded in production yet"), "{text}");
        assert!(text.contains("`tether deploy history SERVICE`"), "{text}");
        let text = render_status(&Status::not_found("environment \"qa\" not found"), &ctx(Subject::Deployment));
        assert!(text.contains("`tether envs list`"), "{text}");
        let text = render_status(&Status::already_exists("release api@v1 differs"), &ctx(Subject::Deployment));
        assert!(text.contains("--command"), "{text}");
        let text = render_status(&Status::not_found("pool \"gpu\" not found"), &ctx(Subject::Environment));
        assert!(text.contains("`tether pools list`"), "{text}");
        let text = render_status(&Status::failed_precondition("cycle"), &ctx(Subject::Environment));
        assert!(text.contains("chain"), "{text}");
    }

    #[test]
    fn empty_messages_are_not_printed_blank() {
        let text = render_status(&Status::internal(""), &ctx(Subject::Job));
        assert!(text.starts_with("error: INTERNAL: (no message)\nhint: "), "{text}");
    }

    #[test]
    fn wrapped_statuses_keep_their_context() {
        let err = anyhow::Error::new(Status::permission_denied("role viewer")).context("cancelling job 7");
        let text = render_error(&err, &ctx(Subject::Job));
        assert!(text.starts_with("error: PERMISSION_DENIED: role viewer\nhint: "), "{text}");
        assert!(text.ends_with("(while cancelling job 7)"), "{text}");
        let plain = anyhow::anyhow!("cannot read payload file x");
        assert_eq!(render_error(&plain, &ctx(Subject::Job)), "error: cannot read payload file x");
    }
}
