//! A tiny HTTP service for the container mesh in `docker/compose.yaml`: it answers with its own
//! name, and on `/chain` it also calls the next services through its sidecar, so one request
//! shows the whole path it took (`a-1 -> b-2 -> c-1`). `/call/SERVICE` calls one service's
//! `/chain` and relays its answer, status included.
//!
//! Settings come from the environment: `INSTANCE` (the name it answers with; default the
//! hostname), `LISTEN` (default `0.0.0.0:8080`), `SIDECAR` (the sidecar's outbound listener;
//! default `127.0.0.1:15001`) and `CALLS` (comma-separated services `/chain` calls, by `Host`).
//!
//! ```sh
//! INSTANCE=a-1 CALLS=b cargo run --example mesh_app
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What every request handler needs.
struct App {
    instance: String,
    sidecar: String,
    calls: Vec<String>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let instance = var("INSTANCE")
        .or_else(|| var("HOSTNAME"))
        .unwrap_or_else(|| "app".into());
    let listen: SocketAddr = var("LISTEN")
        .unwrap_or_else(|| "0.0.0.0:8080".into())
        .parse()
        .map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("LISTEN: {e}"))
        })?;
    let app = Arc::new(App {
        instance,
        sidecar: var("SIDECAR").unwrap_or_else(|| "127.0.0.1:15001".into()),
        calls: var("CALLS")
            .map(|c| c.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default(),
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{} listening on {listen}", app.instance);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            // PID 1 in its container: without a handler, SIGTERM would be ignored.
            _ = term.recv() => return Ok(()),
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: String| {
        let mut resp = Response::new(Full::new(Bytes::from(text + "\n")));
        *resp.status_mut() = status;
        resp
    };
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "ok".into()),
        "/chain" => {
            let mut path = app.instance.clone();
            for service in &app.calls {
                match call(app, service).await {
                    Ok((status, rest)) if status.is_success() => {
                        path.push_str(" -> ");
                        path.push_str(rest.trim_end());
                    }
                    Ok((status, rest)) => {
                        return reply(
                            StatusCode::BAD_GATEWAY,
                            format!("{path} -> {service}: {status}: {}", rest.trim_end()),
                        )
                    }
                    Err(e) => {
                        return reply(StatusCode::BAD_GATEWAY, format!("{path} -> {service}: {e}"))
                    }
                }
            }
            reply(StatusCode::OK, path)
        }
        path if path.starts_with("/call/") => {
            let service = &path["/call/".len()..];
            match call(app, service).await {
                Ok((status, text)) => reply(status, text.trim_end().to_owned()),
                Err(e) => reply(StatusCode::BAD_GATEWAY, format!("{service}: {e}")),
            }
        }
        other => reply(
            StatusCode::OK,
            format!("{} {} {other}", app.instance, req.method()),
        ),
    }
}

/// `GET /chain` on `service`, through the sidecar's outbound listener: its status and body.
async fn call(app: &App, service: &str) -> Result<(StatusCode, String), String> {
    let req = Request::get(format!("http://{}/chain", app.sidecar))
        .header(http::header::HOST, service)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = app.client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
