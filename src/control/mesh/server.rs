//! The mesh port: answers the Raft RPCs of other members over HTTP/2.
//!
//! A request that cannot be decoded gets a 400 with the reason and changes nothing; an error
//! the local Raft returns (a higher vote, a stopped member) travels back in the body as a
//! `Result`, which the caller turns into openraft's `RemoteError`. Bodies are bounded: a peer
//! cannot make this member buffer more than [`MAX_BODY`].

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openraft::Raft;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::network::path;
use super::types::Mesh;
use crate::tasks::Tasks;

/// Largest request body accepted: a snapshot chunk (openraft's default chunk is 3 MiB) with room.
pub const MAX_BODY: usize = 16 << 20;

/// Accepts connections on the mesh port until the tasks are cancelled.
pub async fn serve(socket: TcpListener, raft: Raft<Mesh>, tasks: Tasks) {
    let stop = tasks.token().clone();
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let raft = raft.clone();
        let stop = stop.clone();
        tasks.spawn("mesh_connection", async move {
            tokio::select! {
                () = connection(stream, raft) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Serves one connection (TCP in production, a simulated link in the simulation).
pub async fn connection<IO>(io: IO, raft: Raft<Mesh>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let raft = raft.clone();
        async move { Ok::<_, Infallible>(answer(&raft, req).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Answers one request on the mesh port.
pub async fn answer(raft: &Raft<Mesh>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "mesh RPCs are POSTs\n");
    }
    let route = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("unreadable body: {e}\n")),
    };
    match route.as_str() {
        path::APPEND => match decode(&body) {
            Ok(rpc) => json(&raft.append_entries(rpc).await),
            Err(r) => r,
        },
        path::VOTE => match decode(&body) {
            Ok(rpc) => json(&raft.vote(rpc).await),
            Err(r) => r,
        },
        path::SNAPSHOT => match decode(&body) {
            Ok(rpc) => json(&raft.install_snapshot(rpc).await),
            Err(r) => r,
        },
        _ => text(StatusCode::NOT_FOUND, "no such mesh RPC\n"),
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response<Full<Bytes>>> {
    serde_json::from_slice(body)
        .map_err(|e| text(StatusCode::BAD_REQUEST, &format!("malformed RPC: {e}\n")))
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
