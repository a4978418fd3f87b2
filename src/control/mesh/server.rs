//! The mesh port: the Raft RPCs between members and the registry API sidecars use, over HTTP/2.
//!
//! A request that cannot be decoded gets a 400 with the reason and changes nothing; an error
//! the local Raft returns (a higher vote, a stopped member) travels back in the body as a
//! `Result`, which the caller turns into openraft's `RemoteError`. Bodies are bounded: a peer
//! cannot make this member buffer more than [`MAX_BODY`].
//!
//! The registry API (`/v1/registry...`): writes and renewals go to the leader (any other member
//! answers `307` to the leader's mesh address, or `503 mesh_no_leader`); reads are answered from
//! the local state unless `consistent=true` asks for a linearizable read, and every answer carries
//! the log position it reflects (`x-outrigger-mesh-term`, `x-outrigger-mesh-index`) and, for a
//! local read, how long ago this member last heard from a leader.

// A helper that cannot produce its value produces the answer instead: the error type is the
// response by design, and it is built once per request.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openraft::raft::AppendEntriesResponse;
use openraft::{ChangeMembers, Raft, ServerState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::group::{Contact, LeaderTables, Proposer, WriteError, Written};
use super::leases::Renewal;
use super::network::path;
use super::quota::Refresh;
use super::registry::{Change, Instance, Lease, Registration};
use super::store::State;
use super::types::{LogId, Mesh, NodeId, Op};
use crate::tasks::Tasks;
use crate::tls::ServerTls;

/// Largest request body accepted: a snapshot chunk (openraft's default chunk is 3 MiB) with room.
pub const MAX_BODY: usize = 16 << 20;
/// Longest a blocking registry read waits for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a linearizable read may take to confirm leadership.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Header naming the term of the log position an answer reflects.
pub const TERM_HEADER: &str = "x-outrigger-mesh-term";
/// Header naming the index of the log position an answer reflects.
pub const INDEX_HEADER: &str = "x-outrigger-mesh-index";
/// Header naming the leader a write was redirected to.
pub const LEADER_HEADER: &str = "x-outrigger-mesh-leader";
/// The reason header of a local error answer (as on the data path).
pub const REASON_HEADER: &str = "x-outrigger-error";

/// What the mesh port answers from.
#[derive(Clone)]
pub struct Context {
    /// The member's Raft.
    pub raft: Raft<Mesh>,
    /// The applied state.
    pub state: watch::Receiver<Arc<State>>,
    /// Where writes go.
    pub proposer: Proposer,
    /// The leader's lease table.
    pub leases: Arc<LeaderTables>,
    /// When a leader last counted this member in.
    pub contact: Arc<Contact>,
}

/// How long a peer has to finish the TLS handshake on the mesh port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections on the mesh port until the tasks are cancelled; with `tls`, only peers
/// that present a certificate the mesh's CA signed (and, if listed, an allowed identity).
pub async fn serve(socket: TcpListener, ctx: Context, tasks: Tasks, tls: Option<Arc<ServerTls>>) {
    let stop = tasks.token().clone();
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        tasks.spawn("mesh_connection", async move {
            let served = async {
                match tls {
                    None => connection(stream, ctx).await,
                    Some(tls) => {
                        let acceptor = TlsAcceptor::from(tls.current().config.clone());
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(stream)) => connection(stream, ctx).await,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "mesh TLS handshake failed")
                            }
                            Err(_) => tracing::debug!("mesh TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                () = served => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Serves one connection (TCP in production, a simulated link in the simulation).
pub async fn connection<IO>(io: IO, ctx: Context)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(answer(&ctx, req).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Answers one request on the mesh port.
pub async fn answer(ctx: &Context, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let route = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    if method == Method::GET {
        return match route.strip_prefix("/v1/registry") {
            Some("") | Some("/") => read_all(ctx, &query).await,
            Some(service) if service.starts_with('/') => {
                read_service(ctx, &service[1..], &query).await
            }
            _ => text(StatusCode::NOT_FOUND, "no such mesh resource\n"),
        };
    }
    if method != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("unreadable body: {e}\n")),
    };
    match route.as_str() {
        path::APPEND => match decode(&body) {
            Ok(rpc) => {
                let answer = ctx.raft.append_entries(rpc).await;
                if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                    ctx.contact.touch();
                }
                json(&answer)
            }
            Err(r) => r,
        },
        path::VOTE => match decode(&body) {
            Ok(rpc) => json(&ctx.raft.vote(rpc).await),
            Err(r) => r,
        },
        path::SNAPSHOT => match decode(&body) {
            Ok(rpc) => json(&ctx.raft.install_snapshot(rpc).await),
            Err(r) => r,
        },
        "/v1/registry/register" => match decode::<Registration>(&body) {
            Ok(reg) if reg.ttl_ms == 0 => text(StatusCode::BAD_REQUEST, "ttl_ms must be above 0\n"),
            Ok(reg) => write(ctx, &route, Op::Registry(Change::Register(reg))).await,
            Err(r) => r,
        },
        "/v1/registry/deregister" => match decode::<InstanceRef>(&body) {
            Ok(i) => {
                let op = Op::Registry(Change::Deregister {
                    service: i.service,
                    id: i.id,
                });
                write(ctx, &route, op).await
            }
            Err(r) => r,
        },
        "/v1/members/learner" => match decode::<MemberRef>(&body) {
            Ok(MemberRef {
                id,
                address: Some(addr),
            }) => {
                let added = ctx
                    .raft
                    .add_learner(id, super::types::Member::new(addr), true);
                membership(
                    ctx,
                    &route,
                    tokio::time::timeout(MEMBERSHIP_TIMEOUT, added).await,
                )
            }
            Ok(_) => text(StatusCode::BAD_REQUEST, "a learner needs its `address`\n"),
            Err(r) => r,
        },
        "/v1/members/promote" => match decode::<MemberRef>(&body) {
            Ok(m) => {
                let ids = std::collections::BTreeSet::from([m.id]);
                let change = ctx
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false);
                membership(
                    ctx,
                    &route,
                    tokio::time::timeout(MEMBERSHIP_TIMEOUT, change).await,
                )
            }
            Err(r) => r,
        },
        "/v1/members/remove" => match decode::<MemberRef>(&body) {
            Ok(m) => {
                let ids = std::collections::BTreeSet::from([m.id]);
                let change = ctx
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(ids), false);
                membership(
                    ctx,
                    &route,
                    tokio::time::timeout(MEMBERSHIP_TIMEOUT, change).await,
                )
            }
            Err(r) => r,
        },
        "/v1/registry/renew" => match decode::<Renew>(&body) {
            Ok(r) => renew(ctx, &route, &r.leases),
            Err(r) => r,
        },
        "/v1/quota/refresh" => match decode::<Refresh>(&body) {
            Ok(r) => quota_refresh(ctx, &route, r).await,
            Err(r) => r,
        },
        _ => text(StatusCode::NOT_FOUND, "no such mesh RPC\n"),
    }
}

/// How long a membership change may take (a learner catching up included).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// Names a member in a membership change.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemberRef {
    /// The member's id.
    pub id: NodeId,
    /// Its mesh address (to add a learner).
    #[serde(default)]
    pub address: Option<String>,
}

type MembershipResult = Result<
    Result<
        openraft::raft::ClientWriteResponse<Mesh>,
        openraft::error::RaftError<
            NodeId,
            openraft::error::ClientWriteError<NodeId, super::types::Member>,
        >,
    >,
    tokio::time::error::Elapsed,
>;

fn membership(ctx: &Context, route: &str, result: MembershipResult) -> Response<Full<Bytes>> {
    use openraft::error::{ClientWriteError, RaftError};
    match result {
        Ok(Ok(resp)) => {
            let m = resp.membership.as_ref();
            let voters: Vec<NodeId> = m.map(|m| m.voter_ids().collect()).unwrap_or_default();
            let learners: Vec<NodeId> = m.map(|m| m.learner_ids().collect()).unwrap_or_default();
            let mut r = json(&serde_json::json!({
                "voters": voters,
                "learners": learners,
                "term": resp.log_id.leader_id.term,
                "index": resp.log_id.index,
            }));
            version(&mut r, Some(resp.log_id));
            r
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            redirect(ctx, route, f.leader_id.zip(f.leader_node.map(|n| n.addr)))
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            reason(StatusCode::CONFLICT, "mesh_membership", &format!("{e}\n"))
        }
        Ok(Err(e)) => reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_stopped",
            &format!("{e}\n"),
        ),
        Err(_) => reason(
            StatusCode::GATEWAY_TIMEOUT,
            "mesh_outcome_unknown",
            "the membership change did not commit in time\n",
        ),
    }
}

/// Names an instance.
#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceRef {
    /// Service.
    pub service: String,
    /// Instance id.
    pub id: String,
}

/// A batch of renewals (a sidecar renews everything it registered in one call).
#[derive(Debug, Serialize, Deserialize)]
pub struct Renew {
    /// The leases, each as its registration returned it.
    pub leases: Vec<Lease>,
}

/// The answer to a renewal: one result per lease, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct Renewed {
    /// `renewed`, or `unknown` (register again).
    pub results: Vec<String>,
}

/// The answer to a write.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteAnswer {
    /// What the write did.
    #[serde(flatten)]
    pub applied: super::types::Applied,
    /// Term of the entry that carried it.
    pub term: u64,
    /// Index of the entry that carried it.
    pub index: u64,
}

/// A registry read: what the services held as of a log position, and how fresh that is.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadAnswer {
    /// Services by name (one for a single-service read).
    pub services: BTreeMap<String, ServiceAnswer>,
    /// Term of the last applied entry.
    pub term: u64,
    /// Index of the last applied entry.
    pub index: u64,
    /// Whether the read was linearizable (confirmed with a quorum).
    pub consistent: bool,
    /// The leader this member knows of.
    pub leader: Option<NodeId>,
    /// Milliseconds since this member last heard from a leader (0 on the leader itself when a
    /// quorum answered just now; absent if never).
    pub last_contact_ms: Option<u64>,
}

/// One service in a read.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceAnswer {
    /// Index of the service's last change: pass it as `index` to wait for the next one.
    pub modified: u64,
    /// Its instances.
    pub instances: Vec<Instance>,
}

async fn write(ctx: &Context, route: &str, op: Op) -> Response<Full<Bytes>> {
    match ctx.proposer.propose(op).await {
        Ok(Written { applied, log_id }) => {
            let mut r = json(&WriteAnswer {
                applied,
                term: log_id.leader_id.term,
                index: log_id.index,
            });
            version(&mut r, Some(log_id));
            r
        }
        Err(WriteError::NotLeader(leader)) => redirect(ctx, route, leader),
        Err(WriteError::Busy) => reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_busy",
            "too many writes pending\n",
        ),
        Err(WriteError::Unknown(why)) => reason(
            StatusCode::GATEWAY_TIMEOUT,
            "mesh_outcome_unknown",
            &format!("{why}\n"),
        ),
        Err(WriteError::Stopped(why)) => reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_stopped",
            &format!("{why}\n"),
        ),
    }
}

fn renew(ctx: &Context, route: &str, leases: &[Lease]) -> Response<Full<Bytes>> {
    let state = ctx.state.borrow().clone();
    match ctx.leases.renew(leases, &state) {
        Some(results) => json(&Renewed {
            results: results
                .into_iter()
                .map(|r| match r {
                    Renewal::Renewed => "renewed".to_owned(),
                    Renewal::Unknown => "unknown".to_owned(),
                })
                .collect(),
        }),
        // Rather than have every instance register again, it asks again shortly.
        None => not_leading(ctx, route),
    }
}

/// A sidecar's rate-limit refresh: its demand goes to the leader's allocator, and the answer
/// (its shares) waits up to `wait_ms` for one of them to change past what it holds.
async fn quota_refresh(ctx: &Context, route: &str, r: Refresh) -> Response<Full<Bytes>> {
    if !ctx.leases.refresh(&r) {
        return not_leading(ctx, route);
    }
    let board = &ctx.leases.board;
    let checks = &ctx.leases.checks;
    let now = tokio::time::Instant::now();
    board.post(&r.client, &r.hints, now);
    checks.refresh(&r.client, &r.checks, &r.verdicts, now);
    // Versions of another leader's boards say nothing about this one's.
    let (seen, checks_seen) = if r.hints_epoch == board.epoch() {
        (r.hints_seen, r.checks_seen)
    } else {
        (0, 0)
    };
    let wait = Duration::from_millis(r.wait_ms).min(MAX_QUOTA_WAIT);
    let mut rx = ctx.state.clone();
    let changed = |s: &Arc<State>| s.quotas.changed_for(&r.client, &r.limits, r.holding);
    let _ = tokio::time::timeout(wait, async {
        tokio::select! {
            _ = rx.wait_for(changed) => {}
            () = board.newer_than(seen) => {}
            () = checks.newer_than(checks_seen), if !r.checks.is_empty() => {}
        }
    })
    .await;
    let state = rx.borrow().clone();
    let index = state.applied.map_or(0, |l| l.index);
    let mut granted = state.quotas.granted(&r.client, &r.limits, index);
    let (hints, version) = board.since(&r.client, seen, tokio::time::Instant::now());
    granted.hints = hints;
    granted.hints_seen = version;
    granted.hints_epoch = board.epoch();
    (granted.checks, granted.checks_seen) = checks.answer(&r.checks, checks_seen);
    json(&granted)
}

/// Longest a rate-limit refresh is held for a change.
pub const MAX_QUOTA_WAIT: Duration = Duration::from_secs(5);

/// The answer of a member that is not a leader with its tables: wait for the new leader's
/// tables, or go to the leader.
fn not_leading(ctx: &Context, route: &str) -> Response<Full<Bytes>> {
    let m = ctx.raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        // Elected, but the tables start once the log is applied: ask again shortly.
        return reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_leader_starting",
            "the new leader is catching up\n",
        );
    }
    let leader = m.current_leader.and_then(|id| {
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| (id, n.addr.clone()))
    });
    redirect(ctx, route, leader)
}

fn redirect(
    _ctx: &Context,
    route: &str,
    leader: Option<(NodeId, String)>,
) -> Response<Full<Bytes>> {
    match leader {
        Some((id, addr)) => {
            let mut r = text(StatusCode::TEMPORARY_REDIRECT, "not the leader\n");
            if let Ok(v) = HeaderValue::from_str(&format!("http://{addr}{route}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r.headers_mut().insert(LEADER_HEADER, HeaderValue::from(id));
            r
        }
        None => reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_no_leader",
            "no leader is known\n",
        ),
    }
}

struct Query {
    consistent: bool,
    index: Option<u64>,
    wait: Duration,
}

fn query(q: &str) -> Result<Query, String> {
    let mut out = Query {
        consistent: false,
        index: None,
        wait: Duration::from_secs(30),
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "consistent" => out.consistent = v.is_empty() || v == "true",
            "index" => {
                out.index = Some(
                    v.parse()
                        .map_err(|_| format!("index `{v}` is not a number"))?,
                )
            }
            "wait" => {
                out.wait = humantime::parse_duration(v)
                    .map_err(|e| format!("wait `{v}`: {e}"))?
                    .min(MAX_WAIT)
            }
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    Ok(out)
}

/// Confirms with a quorum that this member leads and has applied all it committed.
async fn linearize(ctx: &Context, route: &str) -> Result<(), Response<Full<Bytes>>> {
    match tokio::time::timeout(READ_TIMEOUT, ctx.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(openraft::error::RaftError::APIError(
            openraft::error::CheckIsLeaderError::ForwardToLeader(f),
        ))) => Err(redirect(
            ctx,
            route,
            f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        )),
        Ok(Err(e)) => Err(reason(
            StatusCode::SERVICE_UNAVAILABLE,
            "mesh_no_quorum",
            &format!("{e}\n"),
        )),
        Err(_) => Err(reason(
            StatusCode::GATEWAY_TIMEOUT,
            "mesh_no_quorum",
            "no quorum answered\n",
        )),
    }
}

async fn read_all(ctx: &Context, q: &str) -> Response<Full<Bytes>> {
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    if q.consistent {
        if let Err(r) = linearize(ctx, "/v1/registry?consistent=true").await {
            return r;
        }
    }
    let state = ctx.state.borrow().clone();
    let services = state
        .registry
        .services()
        .map(|(name, s)| (name.to_owned(), service_answer(s)))
        .collect();
    read_answer(ctx, &state, services, q.consistent)
}

async fn read_service(ctx: &Context, name: &str, q: &str) -> Response<Full<Bytes>> {
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    let mut rx = ctx.state.clone();
    if let Some(seen) = q.index {
        // A blocking read: answer when the service changes past `seen`, or when `wait` is up.
        let changed = |s: &Arc<State>| s.registry.service(name).map_or(0, |s| s.modified) > seen;
        let _ = tokio::time::timeout(q.wait, rx.wait_for(changed)).await;
    }
    if q.consistent {
        if let Err(r) = linearize(ctx, &format!("/v1/registry/{name}?consistent=true")).await {
            return r;
        }
    }
    let state = rx.borrow().clone();
    let mut services = BTreeMap::new();
    if let Some(s) = state.registry.service(name) {
        services.insert(name.to_owned(), service_answer(s));
    }
    read_answer(ctx, &state, services, q.consistent)
}

fn service_answer(s: &super::registry::Service) -> ServiceAnswer {
    ServiceAnswer {
        modified: s.modified,
        instances: s.instances.values().cloned().collect(),
    }
}

fn read_answer(
    ctx: &Context,
    state: &State,
    services: BTreeMap<String, ServiceAnswer>,
    consistent: bool,
) -> Response<Full<Bytes>> {
    let m = ctx.raft.metrics().borrow().clone();
    let last_contact_ms = if m.state == ServerState::Leader {
        m.millis_since_quorum_ack
    } else {
        ctx.contact.since().map(|d| d.as_millis() as u64)
    };
    let mut r = json(&ReadAnswer {
        services,
        term: state.applied.map_or(0, |l| l.leader_id.term),
        index: state.applied.map_or(0, |l| l.index),
        consistent,
        leader: m.current_leader,
        last_contact_ms,
    });
    version(&mut r, state.applied);
    r
}

fn version(r: &mut Response<Full<Bytes>>, log_id: Option<LogId>) {
    let (term, index) = log_id.map_or((0, 0), |l| (l.leader_id.term, l.index));
    r.headers_mut().insert(TERM_HEADER, HeaderValue::from(term));
    r.headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response<Full<Bytes>>> {
    serde_json::from_slice(body).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("malformed request: {e}\n"),
        )
    })
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

fn reason(status: StatusCode, why: &'static str, body: &str) -> Response<Full<Bytes>> {
    let mut r = text(status, body);
    r.headers_mut()
        .insert(REASON_HEADER, HeaderValue::from_static(why));
    r
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
