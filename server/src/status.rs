//! The HTTP status server: health, Prometheus metrics and debug views.
//!
//! It runs on its own address so that scraping and probing keep working when
//! the gRPC port is saturated. Routes are exact paths mapped to handlers in a
//! [`StatusRoutes`] table; [`routes`] builds the node's table, and a new
//! endpoint is one more `.get(...)` there. Handlers must be quick and must
//! not block: they read in-memory state and return. State owned by another
//! task (the change feed's registry) is asked for with `.get_async(...)`,
//! whose future must finish within a bound of its own, so a stuck owner
//! costs one slow answer, never a stuck connection.
//!
//! Connections are HTTP/1.1 via hyper with a bounded header buffer and a
//! header-read timeout, so a slow or hostile client cannot hold memory or a
//! task for long. On shutdown the listener stops accepting and open
//! connections finish their current request and close.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::metrics;
use crate::node::Node;
use crate::shutdown::ShutdownSignal;

/// Longest a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Read buffer limit per connection, which bounds the request head size
/// (hyper's minimum is 8 KiB).
const MAX_BUF_SIZE: usize = 16 * 1024;
/// Longest `/debug/cdc` waits for the feed's answer.
const FEED_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a handler sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct StatusRequest<'a> {
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body.into()),
        }
    }

    /// `value` as pretty JSON, or a 500 if it cannot be serialised.
    pub fn json(value: &impl Serialize) -> Reply {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Reply {
                    status: StatusCode::OK,
                    content_type: "application/json",
                    body: Bytes::from(body),
                }
            }
            Err(err) => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode JSON: {err}\n"),
            ),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        response
    }
}

/// A route handler.
pub type Handler = Arc<dyn Fn(&StatusRequest<'_>) -> Reply + Send + Sync>;

/// The answer of an [`AsyncHandler`].
pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A route handler that waits for its answer. It reads what it needs from
/// the request, then returns a future that owns everything it uses.
pub type AsyncHandler = Arc<dyn Fn(&StatusRequest<'_>) -> ReplyFuture + Send + Sync>;

#[derive(Clone)]
enum Route {
    Sync(Handler),
    Async(AsyncHandler),
}

/// The method a route answers: reads are GET (and HEAD), changes POST, so
/// a crawler or a prefetching browser never changes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Get,
    Post,
}

impl Verb {
    fn allows(self, method: &Method) -> bool {
        match self {
            Verb::Get => method == Method::GET || method == Method::HEAD,
            Verb::Post => method == Method::POST,
        }
    }

    fn allow_header(self) -> &'static str {
        match self {
            Verb::Get => "GET, HEAD",
            Verb::Post => "POST",
        }
    }
}

/// Exact-path routes, each for one [`Verb`].
#[derive(Default, Clone)]
pub struct StatusRoutes {
    routes: BTreeMap<&'static str, (Verb, Route)>,
}

impl StatusRoutes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `handler` for `GET path` (and `HEAD path`). A later call for the
    /// same path replaces the earlier handler.
    pub fn get(
        mut self,
        path: &'static str,
        handler: impl Fn(&StatusRequest<'_>) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes
            .insert(path, (Verb::Get, Route::Sync(Arc::new(handler))));
        self
    }

    /// Like [`StatusRoutes::get`] for a handler that waits (see the module
    /// docs for the bound it must keep).
    pub fn get_async(
        mut self,
        path: &'static str,
        handler: impl Fn(&StatusRequest<'_>) -> ReplyFuture + Send + Sync + 'static,
    ) -> Self {
        self.routes
            .insert(path, (Verb::Get, Route::Async(Arc::new(handler))));
        self
    }

    /// Serves `handler` for `POST path`: an endpoint that changes state.
    /// The handler waits like a [`StatusRoutes::get_async`] one and keeps
    /// the same bound.
    pub fn post_async(
        mut self,
        path: &'static str,
        handler: impl Fn(&StatusRequest<'_>) -> ReplyFuture + Send + Sync + 'static,
    ) -> Self {
        self.routes
            .insert(path, (Verb::Post, Route::Async(Arc::new(handler))));
        self
    }

    /// The registered paths, sorted.
    #[cfg(test)]
    pub fn paths(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.routes.keys().copied()
    }

    /// Dispatches one request: 404 for an unknown path, 405 for a method
    /// the path's route does not answer.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let Some((verb, handler)) = self.routes.get(path) else {
            return Reply::text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n"))
                .into_response();
        };
        if !verb.allows(method) {
            let mut response = Reply::text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}\n"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(verb.allow_header()));
            return response;
        }
        let request = StatusRequest { query };
        match handler {
            Route::Sync(handler) => handler(&request),
            Route::Async(handler) => handler(&request).await,
        }
        .into_response()
    }
}

/// The node's status endpoints. New endpoints are added here.
pub fn routes(node: &Arc<Node>) -> StatusRoutes {
    let metrics_node = Arc::clone(node);
    let debug_node = Arc::clone(node);
    let feed_node = Arc::clone(node);
    let routes = if node.config().server.fault_injection {
        let fault_node = Arc::clone(node);
        StatusRoutes::new().get("/debug/fault/feed", move |request| {
            inject_fault(&fault_node, request.query)
        })
    } else {
        StatusRoutes::new()
    };
    let routes = crate::admin::routes(routes, node);
    routes
        .get("/healthz", |_| Reply::text(StatusCode::OK, "ok\n"))
        .get("/metrics", move |_| match metrics_node.metrics().render() {
            Ok(text) => Reply {
                status: StatusCode::OK,
                content_type: metrics::CONTENT_TYPE,
                body: Bytes::from(text),
            },
            Err(err) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
        })
        .get("/debug/node", move |_| {
            Reply::json(&NodeInfo::from_node(&debug_node))
        })
        .get_async("/debug/cdc", move |_| {
            let feed = feed_node.feed().cloned();
            Box::pin(async move {
                let Some(feed) = feed else {
                    return Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the change feed is not running\n",
                    );
                };
                // A live answer from the feed's owner, as of after every
                // request already sent to it.
                match tokio::time::timeout(FEED_ANSWER_TIMEOUT, feed.debug_snapshot()).await {
                    Ok(Ok(snapshot)) => Reply::json(&snapshot),
                    Ok(Err(err)) => {
                        Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n"))
                    }
                    Err(_) => Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the change feed did not answer within {FEED_ANSWER_TIMEOUT:?}\n"),
                    ),
                }
            })
        })
}

/// `/debug/fault/feed?inject=KIND` (test-only, see [`crate::faults`]).
fn inject_fault(node: &Node, query: Option<&str>) -> Reply {
    let kind = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("inject="));
    let Some(kind) = kind else {
        return Reply::text(StatusCode::BAD_REQUEST, "missing inject=KIND\n");
    };
    match kind.parse::<crate::faults::FeedFault>() {
        Ok(fault) => {
            node.feed_faults().inject(fault);
            Reply::text(StatusCode::OK, format!("injected {kind}\n"))
        }
        Err(e) => Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// The body of `/debug/node`.
#[derive(Debug, Serialize)]
struct NodeInfo {
    cluster_id: u64,
    /// The oracle's highest handed-out timestamp (`physical_ms << 18 | logical`).
    last_ts: u64,
    data_dir: String,
    version: &'static str,
    addr: String,
    advertise_addr: String,
    status_addr: String,
}

impl NodeInfo {
    fn from_node(node: &Node) -> NodeInfo {
        let endpoints = node.endpoints();
        NodeInfo {
            cluster_id: node.cluster_id().get(),
            last_ts: node.last_ts().into_inner(),
            data_dir: node.data_dir().display().to_string(),
            version: env!("CARGO_PKG_VERSION"),
            addr: endpoints.addr.to_string(),
            advertise_addr: endpoints.advertise_addr.clone(),
            status_addr: endpoints.status_addr.to_string(),
        }
    }
}

/// Serves `routes` on `listener` until `shutdown` fires, then lets open
/// connections finish their current request. Each connection task holds a
/// clone of the signal, so the node's shutdown waits for them.
pub async fn serve(listener: TcpListener, routes: StatusRoutes, mut shutdown: ShutdownSignal) {
    let routes = Arc::new(routes);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.recv() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // Per-connection failures (a reset before accept, fd
                // exhaustion) must not end the server; the next accept may
                // well succeed.
                // Back off briefly so a persistent failure does not spin.
                tracing::debug!(%err, "status accept failed");
                tokio::select! {
                    _ = shutdown.recv() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let routes = Arc::clone(&routes);
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let routes = Arc::clone(&routes);
                async move {
                    let uri = req.uri();
                    let response = routes.handle(req.method(), uri.path(), uri.query()).await;
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF_SIZE)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = conn_shutdown.recv() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%err, %peer, "status connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn table() -> StatusRoutes {
        StatusRoutes::new()
            .get("/a", |req| {
                Reply::text(StatusCode::OK, format!("a {:?}", req.query))
            })
            .get("/j", |_| Reply::json(&serde_json::json!({"x": 1})))
    }

    #[tokio::test]
    async fn dispatches_by_exact_path() {
        let routes = table();
        let ok = routes.handle(&Method::GET, "/a", Some("v=1")).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(body(ok).await, "a Some(\"v=1\")");

        let json = routes.handle(&Method::GET, "/j", None).await;
        assert_eq!(json.headers()[CONTENT_TYPE], "application/json");
        let value: serde_json::Value = serde_json::from_str(&body(json).await).expect("valid JSON");
        assert_eq!(value["x"], 1);

        let missing = routes.handle(&Method::GET, "/a/", None).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(body(missing).await.contains("/a/"));
    }

    #[tokio::test]
    async fn only_get_and_head_are_allowed() {
        let routes = table();
        assert_eq!(
            routes.handle(&Method::HEAD, "/a", None).await.status(),
            StatusCode::OK
        );
        let post = routes.handle(&Method::POST, "/a", None).await;
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
        assert_eq!(
            routes.handle(&Method::POST, "/nope", None).await.status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn later_routes_replace_earlier_ones() {
        let routes = table().get("/a", |_| Reply::text(StatusCode::IM_A_TEAPOT, ""));
        assert_eq!(routes.paths().collect::<Vec<_>>(), vec!["/a", "/j"]);
        assert_eq!(
            routes.handle(&Method::GET, "/a", None).await.status(),
            StatusCode::IM_A_TEAPOT
        );
    }

    #[tokio::test]
    async fn async_routes_are_awaited_and_see_the_query() {
        let routes = table().get_async("/wait", |req| {
            let query = req.query.map(str::to_owned);
            Box::pin(async move {
                tokio::task::yield_now().await;
                Reply::text(StatusCode::ACCEPTED, format!("waited {query:?}"))
            })
        });
        let response = routes.handle(&Method::GET, "/wait", Some("x=1")).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(body(response).await, "waited Some(\"x=1\")");
        let post = routes.handle(&Method::POST, "/wait", None).await;
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        // A sync route may replace an async one and the other way round.
        let replaced = routes.get("/wait", |_| Reply::text(StatusCode::OK, ""));
        assert_eq!(
            replaced.handle(&Method::GET, "/wait", None).await.status(),
            StatusCode::OK
        );
    }
}
