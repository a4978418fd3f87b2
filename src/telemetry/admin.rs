//! The admin server: liveness, readiness, metrics, the active config and cluster state.
//!
//! It binds loopback by default and only reads: nothing here changes the proxy. Endpoints:
//! `/live`, `/ready` (503 while draining), `/metrics` (Prometheus text), `/config` and `/clusters`
//! (JSON), and `/` (an HTML page linking them).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;

/// Serves the admin API on `socket` until `stop` fires.
pub async fn serve(socket: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
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
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
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

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        "/" => html(index(shared)),
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if shared.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/config" => json_response(config_json(shared)),
        "/clusters" => json_response(clusters_json(shared)),
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

/// The active config, its version and hash, the bound listeners and the last reload error.
pub fn config_json(shared: &Shared) -> serde_json::Value {
    let active = shared.active.load();
    let applied = active
        .applied_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "version": active.version,
        "hash": active.loaded.hash,
        "file": active.loaded.file,
        "applied_at_unix": applied,
        "last_reload_error": shared.last_error.load().as_deref(),
        "listeners": active.listeners.iter().map(|l| json!({
            "name": l.name,
            "protocol": l.protocol,
            "address": l.configured.to_string(),
            "bound_address": l.bound.to_string(),
        })).collect::<Vec<_>>(),
        "config": active.loaded.raw,
    })
}

/// Every cluster with its endpoints and their counters.
pub fn clusters_json(shared: &Shared) -> serde_json::Value {
    let active = shared.active.load();
    let clusters: Vec<_> = active
        .clusters
        .iter()
        .map(|c| {
            let endpoints: Vec<_> = c
                .endpoints()
                .iter()
                .map(|e| {
                    json!({
                        "address": e.authority.as_str(),
                        "source": e.source,
                        "weight": e.weight,
                        "health": e.health().name(),
                        "ejected": e.ejected_for().is_some(),
                        "ejected_ms": e.ejected_for().map(|d| d.as_millis() as u64),
                        "ejections": e.ejections.load(Ordering::Relaxed),
                        "reconnect_in_ms": e.reconnect_in().map(|d| d.as_millis() as u64),
                        "latency_ewma_ms": e.latency().map(|d| d.as_secs_f64() * 1000.0),
                        "requests": e.requests.load(Ordering::Relaxed),
                        "in_flight": e.in_flight.load(Ordering::Relaxed),
                        "connect_failures": e.connect_failures.load(Ordering::Relaxed),
                        "circuit": e.breaker.as_ref().map(|b| b.state().name()),
                        "circuit_open_ms": e.breaker.as_ref().and_then(|b| b.open_for()).map(|d| d.as_millis() as u64),
                    })
                })
                .collect();
            json!({
                "name": c.name(),
                "protocol": match c.config.protocol {
                    crate::control::config::UpstreamProtocol::Http1 => "http1",
                    crate::control::config::UpstreamProtocol::Http2 => "http2",
                },
                "connect_timeout_ms": c.config.connect_timeout.as_millis() as u64,
                "discovery": match &c.config.upstream.discovery {
                    crate::control::config::upstream::Discovery::Static(_) => "static",
                    crate::control::config::upstream::Discovery::Dns(_) => "dns",
                },
                "load_balancer": c.config.upstream.balancer.name(),
                "panic": c.panicking(),
                "circuit": c.breaker.as_ref().map(|b| b.state().name()),
                "circuit_open_ms": c.breaker.as_ref().and_then(|b| b.open_for()).map(|d| d.as_millis() as u64),
                "bulkhead": {
                    "max_concurrent": c.config.bulkhead.max_concurrent,
                    "max_pending": c.config.bulkhead.max_pending,
                },
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "clusters": clusters })
}

fn index(shared: &Shared) -> String {
    let active = shared.active.load();
    let state = if shared.is_ready() {
        "ready"
    } else {
        "draining"
    };
    let mut listeners = String::new();
    for l in &active.listeners {
        listeners.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&l.name),
            l.protocol,
            l.bound
        ));
    }
    let error = shared
        .last_error
        .load()
        .as_deref()
        .map(|e| format!("<h2>Last reload error</h2><pre>{}</pre>", escape(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Outrigger admin</title></head><body>\
         <h1>Outrigger {}</h1><p>State: <b>{state}</b>. Config version {} ({}), hash <code>{}</code>.</p>\
         <table border=1 cellpadding=4><tr><th>listener</th><th>protocol</th><th>bound</th></tr>{listeners}</table>{error}\
         <ul><li><a href=/live>/live</a></li><li><a href=/ready>/ready</a></li><li><a href=/metrics>/metrics</a></li>\
         <li><a href=/config>/config</a></li><li><a href=/clusters>/clusters</a></li></ul></body></html>",
        env!("CARGO_PKG_VERSION"),
        active.version,
        escape(&active.loaded.file),
        &active.loaded.hash,
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

fn html(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
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
