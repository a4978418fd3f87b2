//! How a sidecar talks to the group's registry API: any member will do, redirects lead to the
//! leader, and a member that fails or is slow is skipped for the next one.
//!
//! Voters and learners hold the registry themselves and read it locally; this client is for
//! `role: client` sidecars (most of the fleet) and for writes, which only the leader takes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

use crate::tls::{ClientTls, UpstreamConnector};

/// A call that got no usable answer from any member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

/// A client of the registry API on the members' mesh ports.
#[derive(Clone, Debug)]
pub struct MeshClient {
    members: Arc<[String]>,
    next: Arc<AtomicUsize>,
    http: HttpClient<UpstreamConnector, Full<Bytes>>,
}

/// Redirects followed before a call gives up on a member.
const MAX_REDIRECTS: usize = 3;

impl MeshClient {
    /// A client of the members at `members` (`host:port` mesh addresses), over mutual TLS
    /// when `tls` is given (the mesh's `tls` section).
    pub fn new(members: Vec<String>, tls: Option<Arc<ClientTls>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(1)));
        let connector = UpstreamConnector::new(http, tls);
        MeshClient {
            members: members.into(),
            next: Arc::new(AtomicUsize::new(0)),
            http: HttpClient::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }

    /// Sends `method path` with `body` to one member after another until one answers (a
    /// redirect to the leader is followed), each try bounded by `timeout`. Returns the status
    /// and body of the first answer that is not a redirect or a 503.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let mut last = CallError("no mesh members configured".into());
        for _ in 0..self.members.len() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.members.len();
            let mut url = format!("http://{}{path}", self.members[i]);
            for _ in 0..=MAX_REDIRECTS {
                match self.once(&method, &url, body.clone(), timeout).await {
                    Ok((StatusCode::TEMPORARY_REDIRECT, _, Some(to))) => url = to,
                    Ok((StatusCode::SERVICE_UNAVAILABLE, text, _)) => {
                        last = CallError(format!(
                            "{} answered 503: {}",
                            self.members[i],
                            String::from_utf8_lossy(&text).trim()
                        ));
                        break;
                    }
                    Ok((status, text, _)) => {
                        // Stick with a member that answers.
                        self.next.store(i, Ordering::Relaxed);
                        return Ok((status, text));
                    }
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    async fn once(
        &self,
        method: &Method,
        url: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes, Option<String>), CallError> {
        let req = Request::builder()
            .method(method.clone())
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| CallError(format!("{url}: {e}")))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| CallError(format!("{url}: {e}")))?;
            let status = resp.status();
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError(format!("{url}: {e}")))?
                .to_bytes();
            Ok((status, text, location))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CallError(format!("{url}: no answer within {timeout:?}")))?
    }
}
