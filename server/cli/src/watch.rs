//! `tether watch`: dashboard job, deployment and agent changes as they
//! happen (DashboardService.WatchEvents), until Ctrl-C or the server ends
//! the stream.
//!
//! Each change is one line, or with `--output json` each message (keep-alives
//! and resets too) is one JSON object per line, cursor included. A reset
//! (changes were missed) is also noted on stderr. A stream that fails is
//! reported like any failed call, with the cursor to resume from.

use std::process::ExitCode;

use anyhow::Context as _;
use tether::v1::watch_events_response::Event;
use tether::v1::{WatchEventsRequest, WatchEventsResponse};

use crate::args::{OutputFormat, WatchArgs};
use crate::client::Ctx;
use crate::output;

/// Builds the WatchEventsRequest from the flags: the kinds in the order
/// first given, each once (the server takes at most one of each).
pub(crate) fn build_request(args: &WatchArgs) -> WatchEventsRequest {
    let mut kinds = Vec::new();
    for kind in &args.kinds {
        let kind = kind.event_kind() as i32;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    WatchEventsRequest { kinds, cursor: args.cursor.clone().unwrap_or_default() }
}

/// Resolves on Ctrl-C; never, if no handler could be installed (then only
/// the stream's end stops the command).
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) async fn run(args: WatchArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let request = ctx.clients.req(build_request(&args));
    let mut client = ctx.clients.dashboard.clone();
    let stop = interrupted();
    tokio::pin!(stop);
    // The call answers after the server's first read from the cursor, so an
    // invalid cursor is the call's status.
    let mut stream = tokio::select! {
        () = &mut stop => return Ok(ExitCode::SUCCESS),
        response = client.watch_events(request) => response?.into_inner(),
    };
    let mut cursor = args.cursor.clone().unwrap_or_default();
    loop {
        let message = tokio::select! {
            () = &mut stop => return Ok(ExitCode::SUCCESS),
            message = stream.message() => message,
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(status) if cursor.is_empty() => return Err(status.into()),
            Err(status) => {
                return Err(status).with_context(|| format!("watching events; resume with --cursor {cursor}"));
            }
        };
        print_message(ctx, &message, args.show_cursor)?;
        if !message.cursor.is_empty() {
            cursor.clone_from(&message.cursor);
        }
    }
}

/// Prints one message as it arrives: the JSON line, or the change's line
/// (keep-alives print nothing); a reset is also noted on stderr.
fn print_message(ctx: &mut Ctx<'_>, message: &WatchEventsResponse, show_cursor: bool) -> anyhow::Result<()> {
    let cursor = if show_cursor && ctx.format == OutputFormat::Table {
        format!(" cursor={}", message.cursor)
    } else {
        String::new()
    };
    match ctx.format {
        OutputFormat::Json => writeln!(ctx.out, "{}", output::to_json_line(message)?)?,
        OutputFormat::Table => {
            if let Some(line) = output::format_watch_event(message) {
                writeln!(ctx.out, "{line}{cursor}")?;
            }
        }
    }
    ctx.out.flush()?;
    if let Some(Event::Reset(reset)) = &message.event {
        let reason = if reset.reason.trim().is_empty() { "changes were missed" } else { reset.reason.trim() };
        writeln!(ctx.err, "reset: {reason}; continuing from the present{cursor}")?;
        ctx.err.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::v1::EventKind;

    use crate::args::WatchKind;

    #[test]
    fn kinds_are_sent_once_each_in_the_order_given() {
        let args = WatchArgs {
            kinds: vec![WatchKind::Agent, WatchKind::Job, WatchKind::Agent, WatchKind::Job],
            cursor: Some("c7".into()),
            show_cursor: false,
        };
        let r = build_request(&args);
        assert_eq!(r.kinds, [EventKind::Agent as i32, EventKind::Job as i32]);
        assert_eq!(r.cursor, "c7");

        let all = WatchArgs { kinds: Vec::new(), cursor: None, show_cursor: true };
        assert_eq!(build_request(&all), WatchEventsRequest::default(), "no kinds: every kind, from now");
    }
}
