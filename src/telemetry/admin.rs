//! The admin server: liveness, readiness, metrics, the active config and cluster state.
//!
//! It binds loopback by default and only reads the proxy: nothing here changes it. Endpoints:
//! `/live`, `/ready` (503 while draining), `/metrics` (Prometheus text), `/config` and `/clusters`
//! (JSON), and `/` (an HTML page linking them). On a mesh member, `/mesh` and `/registry` show
//! the group, and the operator's calls to the group — membership changes
//! (`POST /mesh/members/{learner,promote,remove}`) and linearizable reads
//! (`/registry?consistent=true`) — are handed to it through the view, which follows the group to
//! its leader.
//!
//! It sees the proxy only through a [`View`] it is handed: a narrow window, read-only except for
//! the calls it hands to the mesh group, that the composition root implements, so this module imports nothing of the data path or the control
//! side. Connections are served on supervised tasks that end when the admin group is cancelled,
//! which shutdown does last, so `/ready` answers `draining` for as long as listeners drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::tasks::Tasks;

/// What the admin server may read of the running proxy, and the calls it may hand to the group.
pub trait View: Send + Sync + 'static {
    /// Whether the proxy takes traffic (false while draining).
    fn ready(&self) -> bool;
    /// Every metric in the Prometheus text format.
    fn metrics(&self) -> Vec<u8>;
    /// The active config, its version and the last reload error, as JSON.
    fn config(&self) -> serde_json::Value;
    /// Every cluster with its endpoints and their state, as JSON.
    fn clusters(&self) -> serde_json::Value;
    /// The facts the index page shows.
    fn summary(&self) -> Summary;
    /// The mesh member's state (members, roles, leader, term, log positions, lag), as JSON;
    /// `None` when this sidecar is no mesh member.
    fn mesh(&self) -> Option<serde_json::Value> {
        None
    }
    /// The registry as this member holds it, as JSON; `None` when this sidecar is no member.
    fn registry(&self) -> Option<serde_json::Value> {
        None
    }
    /// Sends `method path` (a path of the group's API) with `body` to the group, following it
    /// to the leader; `None` when this sidecar is no mesh member.
    fn mesh_call(&self, method: Method, path: String, body: Bytes) -> Option<MeshCall> {
        let _ = (method, path, body);
        None
    }
}

/// A call to the mesh group in flight: it ends with the status and body to answer.
pub type MeshCall = Pin<Box<dyn Future<Output = (StatusCode, Bytes)> + Send>>;

/// The live admin page: one self-contained HTML file whose script polls `/config`, `/clusters`,
/// `/metrics`, `/mesh` and `/ready`.
const UI: &str = include_str!("ui.html");

/// The largest body a membership change may carry.
const MAX_BODY: usize = 64 * 1024;

/// The facts the index page shows.
pub struct Summary {
    /// Active config version.
    pub version: u64,
    /// The config's file name.
    pub file: String,
    /// The config's hash.
    pub hash: String,
    /// Each listener: name, protocol and bound address.
    pub listeners: Vec<(String, &'static str, SocketAddr)>,
    /// The last reload error, if the last reload failed.
    pub last_error: Option<String>,
}

/// Serves the admin API on `socket` until `tasks` is cancelled; each connection is a task there.
pub async fn serve(socket: TcpListener, view: Arc<dyn View>, tasks: Tasks) {
    let stop = tasks.token().clone();
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let view = view.clone();
        let stop = stop.clone();
        tasks.spawn("admin_connection", async move {
            let svc = service_fn(move |req| {
                let view = view.clone();
                async move { Ok::<_, Infallible>(answer(view.as_ref(), req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// The calls handed to the group: a membership change, or a registry read that asks for
/// consistency.
async fn answer(view: &dyn View, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let forward = match (req.method(), path) {
        (&Method::POST, p) => p
            .strip_prefix("/mesh/members/")
            .filter(|change| matches!(*change, "learner" | "promote" | "remove"))
            .map(|change| format!("/v1/members/{change}")),
        (&Method::GET, p) if query.split('&').any(|kv| kv.starts_with("consistent")) => p
            .strip_prefix("/registry")
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .map(|rest| format!("/v1/registry{rest}?{query}")),
        _ => None,
    };
    let Some(forward) = forward else {
        return route(view, &req);
    };
    let method = req.method().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable or oversized body\n"),
    };
    match view.mesh_call(method, forward, body) {
        Some(call) => {
            let (status, body) = call.await;
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = status;
            let kind = if status.is_success() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
            r
        }
        None => text(StatusCode::NOT_FOUND, "this sidecar is not a mesh member\n"),
    }
}

fn route(view: &dyn View, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        "/" => html(index(view)),
        // Static: the page polls the JSON endpoints itself.
        "/ui" => html(UI),
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if view.ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(view.metrics())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/config" => json_response(view.config()),
        "/clusters" => json_response(view.clusters()),
        "/mesh" => match view.mesh() {
            Some(v) => json_response(v),
            None => text(StatusCode::NOT_FOUND, "this sidecar is not a mesh member\n"),
        },
        "/registry" => match view.registry() {
            Some(v) => json_response(v),
            None => text(StatusCode::NOT_FOUND, "this sidecar is not a mesh member\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

fn index(view: &dyn View) -> String {
    let s = view.summary();
    let state = if view.ready() { "ready" } else { "draining" };
    let mut listeners = String::new();
    for (name, protocol, bound) in &s.listeners {
        listeners.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            protocol,
            bound
        ));
    }
    let error = s
        .last_error
        .as_deref()
        .map(|e| format!("<h2>Last reload error</h2><pre>{}</pre>", escape(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Outrigger admin</title></head><body>\
         <h1>Outrigger {}</h1><p><a href=/ui><b>Open the live page (/ui)</b></a></p><p>State: <b>{state}</b>. Config version {} ({}), hash <code>{}</code>.</p>\
         <table border=1 cellpadding=4><tr><th>listener</th><th>protocol</th><th>bound</th></tr>{listeners}</table>{error}\
         <ul><li><a href=/live>/live</a></li><li><a href=/ready>/ready</a></li><li><a href=/metrics>/metrics</a></li>\
         <li><a href=/config>/config</a></li><li><a href=/clusters>/clusters</a></li></ul></body></html>",
        env!("CARGO_PKG_VERSION"),
        s.version,
        escape(&s.file),
        escape(&s.hash),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn html(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn json_response(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
