//! The gRPC clients one command uses, and the context a command runs in
//! (where output goes, which format, whether to show progress).

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use tether::v1::agent_service_client::AgentServiceClient;
use tether::v1::dashboard_service_client::DashboardServiceClient;
use tether::v1::queue_service_client::QueueServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::args::{GlobalArgs, OutputFormat, PageArgs};
use crate::error::UsageError;

/// How long to wait for the TCP/HTTP2 connection before reporting
/// UNAVAILABLE; a dead address should fail fast, not hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Responses may hold up to 1000 jobs with payloads of up to 1 MiB each;
/// tonic's 4 MiB default would turn a big listing into an error.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Every service client on one lazily-connected channel, plus the
/// credential to attach to every request.
#[derive(Clone)]
pub(crate) struct Clients {
    pub queue: QueueServiceClient<Channel>,
    pub agents: AgentServiceClient<Channel>,
    pub dashboard: DashboardServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Clients {
    /// Builds the clients for `global.server`. The channel connects on the
    /// first call, so an unreachable server surfaces as an UNAVAILABLE
    /// status from that call, with the same error path as every other
    /// failure.
    pub fn new(global: &GlobalArgs) -> anyhow::Result<Self> {
        let server = normalize_server(&global.server);
        let endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| {
                UsageError(format!(
                    "invalid --server {:?} ({e}); expected a URL like http://127.0.0.1:50051",
                    global.server
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let authorization = match global.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| UsageError("the token contains characters not allowed in a gRPC header".into()))?,
            ),
        };
        Ok(Self {
            queue: QueueServiceClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES),
            agents: AgentServiceClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES),
            dashboard: DashboardServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
            authorization,
        })
    }

    /// Wraps a message in a request carrying the credential, if any.
    pub fn req<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }
}

/// Accepts `host:port` as well as a URL: operators type the short form, and
/// tonic needs a scheme.
pub(crate) fn normalize_server(server: &str) -> String {
    let server = server.trim();
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// Everything a command needs besides its own arguments.
pub(crate) struct Ctx<'a> {
    pub clients: Clients,
    pub format: OutputFormat,
    /// Results go here (stdout in the binary).
    pub out: &'a mut (dyn Write + Send),
    /// Notes for the operator that are not results (stderr in the binary),
    /// so stdout stays clean for scripts.
    pub err: &'a mut (dyn Write + Send),
    /// Whether to draw a spinner on the terminal while waiting.
    pub progress: bool,
    /// Whether results go to a terminal (so `--watch` may redraw the
    /// screen rather than append).
    pub tty: bool,
}

/// Fetches one page, or every page with `--all`, of a paged List call.
///
/// `fetch` gets a page token and returns the page's items and next token.
/// Returns the items and the token of the page after the last one fetched
/// (empty when the listing is complete).
pub(crate) async fn collect_pages<T, F, Fut>(page: &PageArgs, mut fetch: F) -> anyhow::Result<(Vec<T>, String)>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut items = Vec::new();
    let mut token = page.page_token.clone().unwrap_or_default();
    loop {
        let (mut batch, next) = fetch(token.clone()).await?;
        items.append(&mut batch);
        if !page.all || next.is_empty() {
            return Ok((items, next));
        }
        // A server that hands back the token it was given would keep us
        // here forever.
        if next == token {
            anyhow::bail!("the server returned the same page token twice; stopping the listing");
        }
        token = next;
    }
}

/// Reads a payload file, or stdin for `-`.
pub(crate) async fn read_payload_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    read_input_file(path, "payload").await
}

/// Reads a file, or stdin for `-`; `what` names its contents in errors
/// ("payload", "script").
pub(crate) async fn read_input_file(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        use tokio::io::AsyncReadExt as _;
        let mut buf = Vec::new();
        tokio::io::stdin().read_to_end(&mut buf).await.with_context(|| format!("cannot read the {what} from stdin"))?;
        return Ok(buf);
    }
    tokio::fs::read(path).await.with_context(|| format!("cannot read {what} file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(normalize_server("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(normalize_server(" http://h:1 "), "http://h:1");
        assert_eq!(normalize_server("https://h:1"), "https://h:1");
    }

    #[tokio::test]
    async fn bad_server_and_token_are_usage_errors() {
        let mut global = GlobalArgs::new("http://bad host:1");
        let err = Clients::new(&global).err().expect("bad url refused");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        global.server = "http://127.0.0.1:1".into();
        global.token = Some("tok\nen".into());
        let err = Clients::new(&global).err().expect("bad token refused");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        global.token = Some("good-token".into());
        let clients = Clients::new(&global).expect("builds");
        let req = clients.req(());
        assert_eq!(req.metadata().get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer good-token"));
    }

    #[tokio::test]
    async fn all_pages_are_collected() {
        let page = PageArgs { all: true, ..Default::default() };
        let (items, next) = collect_pages(&page, |token| async move {
            Ok(match token.as_str() {
                "" => (vec![1, 2], "p2".to_string()),
                "p2" => (vec![3], "p3".to_string()),
                _ => (vec![4], String::new()),
            })
        })
        .await
        .expect("collects");
        assert_eq!(items, [1, 2, 3, 4]);
        assert!(next.is_empty());

        let one = PageArgs::default();
        let (items, next) = collect_pages(&one, |_| async { Ok((vec![1], "p2".to_string())) }).await.expect("collects");
        assert_eq!((items, next.as_str()), (vec![1], "p2"));

        let stuck = collect_pages(&page, |_| async { Ok((vec![1], "same".to_string())) }).await;
        assert!(stuck.is_err());
    }
}
