//! Raft RPCs between members: HTTP/2 over the mesh port, one connection per peer, every call
//! bounded by a timeout.
//!
//! How a connection is made sits behind [`Connect`], so the deterministic simulation can put a
//! simulated network where production has TCP (and, with `mesh.tls`, mutual TLS). A call that
//! fails or times out drops the peer's connection: after a partition a half-delivered HTTP/2
//! stream never recovers, and the next call dials again. Failures map to openraft's errors the way
//! its replication loop expects: a failed dial is `Unreachable` (it backs off for
//! [`Network::backoff`]), anything else on the wire is `Network` (retried on the next heartbeat),
//! and an error the peer's Raft returned travels back as `RemoteError`.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

use super::types::{Member, Mesh, NodeId};
use crate::tls::{ClientTls, UpstreamStream};

/// Paths of the Raft RPCs on the mesh port.
pub mod path {
    /// AppendEntries (replication and heartbeats).
    pub const APPEND: &str = "/raft/append";
    /// RequestVote.
    pub const VOTE: &str = "/raft/vote";
    /// One chunk of a snapshot.
    pub const SNAPSHOT: &str = "/raft/snapshot";
}

/// Opens a byte stream to a member's mesh address: TCP (optionally TLS) in production, a
/// simulated link in the deterministic simulation.
pub trait Connect: Clone + Send + Sync + 'static {
    /// The stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Dials `addr` (`host:port`).
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// TCP, with mutual TLS when the mesh has a `tls` section.
#[derive(Clone, Default)]
pub struct Tcp {
    tls: Option<Arc<ClientTls>>,
}

impl Tcp {
    /// Dials with TLS (presenting this member's certificate) when `tls` is given.
    pub fn new(tls: Option<Arc<ClientTls>>) -> Self {
        Tcp { tls }
    }
}

impl Connect for Tcp {
    type Io = UpstreamStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        match &self.tls {
            None => Ok(UpstreamStream::Plain(s)),
            Some(tls) => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                Ok(UpstreamStream::Tls(Box::new(tls.connect(s, host).await?)))
            }
        }
    }
}

/// Hands openraft a client per peer; clients to the same peer share one connection.
pub struct Network<C: Connect> {
    connect: C,
    backoff: Duration,
    peers: std::collections::HashMap<NodeId, Arc<Peer>>,
}

impl<C: Connect> Network<C> {
    /// A network that dials with `connect` and, after a failed dial, waits `backoff` before
    /// the next call to that peer (openraft's default of 500 ms exceeds an election timeout).
    pub fn new(connect: C, backoff: Duration) -> Self {
        Network {
            connect,
            backoff,
            peers: Default::default(),
        }
    }
}

/// One peer's address and its current connection, if any.
#[derive(Debug)]
struct Peer {
    addr: String,
    conn: Mutex<Link>,
}

/// A peer's connection, and when it may be dialled again after a failed dial.
#[derive(Debug, Default)]
struct Link {
    tx: Option<SendRequest<Full<Bytes>>>,
    dial_after: Option<tokio::time::Instant>,
}

/// openraft's handle for calls to one peer.
pub struct Client<C: Connect> {
    target: NodeId,
    connect: C,
    peer: Arc<Peer>,
    backoff: Duration,
}

impl<C: Connect> RaftNetworkFactory<Mesh> for Network<C> {
    type Network = Client<C>;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        let peer = self
            .peers
            .entry(target)
            .and_modify(|p| {
                if p.addr != node.addr {
                    // The member moved: a fresh peer, so the old connection is not reused.
                    *p = Arc::new(Peer {
                        addr: node.addr.clone(),
                        conn: Mutex::new(Link::default()),
                    });
                }
            })
            .or_insert_with(|| {
                Arc::new(Peer {
                    addr: node.addr.clone(),
                    conn: Mutex::new(Link::default()),
                })
            })
            .clone();
        Client {
            target,
            connect: self.connect.clone(),
            peer,
            backoff: self.backoff,
        }
    }
}

/// Why a call failed, before it is mapped to openraft's error for the RPC at hand.
enum CallError {
    Dial(io::Error),
    Wire(AnyError),
}

impl<C: Connect> Client<C> {
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let mut conn = self.peer.conn.lock().await;
        if let Some(tx) = conn.tx.as_ref() {
            if !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        // At most one dial per backoff: a peer that refuses at once (restarting, port closed)
        // would otherwise be dialled in a loop by whichever caller does not back off itself
        // (openraft's snapshot and vote paths), spinning a core.
        if let Some(after) = conn.dial_after {
            tokio::time::sleep_until(after).await;
        }
        let io = match self.connect.connect(&self.peer.addr).await {
            Ok(io) => io,
            Err(e) => {
                conn.dial_after = Some(tokio::time::Instant::now() + self.backoff);
                return Err(CallError::Dial(e));
            }
        };
        conn.dial_after = None;
        let (tx, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| CallError::Dial(io::Error::other(e)))?;
        tokio::spawn(async move {
            // The connection ends when the peer goes or the sender is dropped; either way the
            // next call dials again.
            let _ = connection.await;
        });
        conn.tx = Some(tx.clone());
        Ok(tx)
    }

    async fn forget(&self) {
        self.peer.conn.lock().await.tx = None;
    }

    /// POSTs `body` to `path` and decodes the peer's `Result`, within `timeout`.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let result = tokio::time::timeout(timeout, self.exchange(path, body)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(CallError::Wire(AnyError::error(format!(
                "no answer from node {} within {timeout:?}",
                self.target
            )))),
        };
        if result.is_err() {
            self.forget().await;
        }
        result
    }

    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, CallError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CallError::Wire(AnyError::new(&e)))?;
        let mut tx = self.sender().await?;
        let req = Request::post(format!("http://{}{path}", self.peer.addr))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CallError::Wire(AnyError::new(&e)))?;
        tx.ready()
            .await
            .map_err(|e| CallError::Wire(AnyError::new(&e)))?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| CallError::Wire(AnyError::new(&e)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::Wire(AnyError::new(&e)))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(CallError::Wire(AnyError::error(format!(
                "node {} answered {status}: {}",
                self.target,
                String::from_utf8_lossy(&body)
            ))));
        }
        serde_json::from_slice(&body).map_err(|e| CallError::Wire(AnyError::new(&e)))
    }

    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        match self
            .call::<Req, Result<Resp, RaftError<NodeId, E>>>(path, req, option.soft_ttl())
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(CallError::Dial(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(CallError::Wire(e)) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl<C: Connect> RaftNetwork<Mesh> for Client<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Mesh>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc(path::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<Mesh>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(path::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc(path::VOTE, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
