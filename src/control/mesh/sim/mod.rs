//! Deterministic simulation of the mesh group: real members (the redb store, openraft, the mesh
//! port's HTTP/2 handlers) on turmoil's simulated network and clock, under a fault schedule drawn
//! from a seed — partitions, one-way partitions, held (delayed) and lossy links, slow links, and
//! crashes with restarts from the member's disk. Clients register, deregister and read
//! linearizably; every service's history must pass the linearizability checker, and once healed
//! every member must hold the same registry. Sidecars meanwhile refresh their shares of a
//! mesh-wide rate limit with demands that jump at random, and the shares they may be enforcing
//! (each for its grant from the moment it asked) must never add up to more than the rate.
//!
//! How far a run replays: the fault schedule and the clients' choices come from the seed alone,
//! and each member's election timeout is fixed by the seed (openraft draws it from the OS random
//! number generator, so the range is one millisecond wide). `a_seed_replays_to_the_same_history`
//! checks that two runs of one seed give the same history. A failing schedule is printed in the
//! text form `regressions.txt` keeps, and every case kept there is replayed by the test suite.
//!
//! `OUTRIGGER_SIM_SEEDS=N` runs N seeds per group size instead of the default;
//! `OUTRIGGER_SIM_SEED=S` runs one seed.

mod linearizability;
mod schedule;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use self::linearizability::{Call, Model};
use self::schedule::{Fault, Schedule};
use super::network::Connect;
use super::node::{Node, Settings};
use super::quota::{self, Granted, LimitDemand, Refresh};
use super::registry::Registration;
use super::server::{self, ReadAnswer, WriteAnswer};
use super::store::{self, State};
use super::types::Applied;
use crate::control::mesh::registry::Outcome;
use crate::tasks::Tasks;

/// The mesh port every simulated member listens on.
const PORT: u16 = 7000;
/// Clients issue operations until this moment; the schedule heals everything then.
const RUN_MS: u64 = 6_000;
/// The final reads start this long after the heal.
const SETTLE_MS: u64 = 1_500;
/// The run is cut off here (the final reads retry until then).
const LIMIT_MS: u64 = 20_000;
/// Services the clients touch (each is one key for the checker).
const SERVICES: &[&str] = &["api", "db", "web"];
/// Instance ids per service.
const IDS: &[&str] = &["a", "b", "c"];
/// Clients issuing operations concurrently.
const CLIENTS: usize = 3;
/// The simulation's step: every host runs this much simulated time per step.
const TICK_MS: u64 = 10;
/// How long a client waits for one HTTP exchange.
const ATTEMPT: Duration = Duration::from_millis(1_000);
/// Sidecars sharing one mesh-wide rate limit.
const SIDECARS: usize = 3;
/// The limit's rate, requests per second.
const QUOTA_RATE: f64 = 100.0;

/// A member's disk: the bytes of its redb file, kept by the simulation across crashes, and
/// whether a database has it open (a restart while the crashed member's database still lived
/// would be two writers on one file).
#[derive(Clone, Debug, Default)]
struct Disk {
    bytes: Arc<Mutex<Vec<u8>>>,
    open: Arc<AtomicBool>,
}

impl Disk {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.bytes().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let bytes = self.bytes();
        let start = offset as usize;
        let end = start + out.len();
        match bytes.get(start..end) {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            )),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.bytes().resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.open.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut bytes = self.bytes();
        let start = offset as usize;
        let end = start + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// Dials over turmoil's simulated network.
#[derive(Clone, Copy, Debug)]
struct SimNet;

impl Connect for SimNet {
    type Io = turmoil::net::TcpStream;

    async fn connect(&self, addr: &str) -> io::Result<Self::Io> {
        turmoil::net::TcpStream::connect(addr).await
    }
}

fn host(id: u8) -> String {
    format!("n{id}")
}

fn addr(id: u8) -> String {
    format!("n{id}:{PORT}")
}

/// One simulated run: the group size, the seed, the faults.
#[derive(Clone, Debug)]
pub struct Case {
    voters: u8,
    seed: u64,
    schedule: Schedule,
    /// The negative control: reads answered from whichever member is asked, without
    /// confirming leadership, yet recorded as linearizable.
    stale_reads: bool,
}

impl Case {
    fn drawn(voters: u8, seed: u64) -> Case {
        Case {
            voters,
            seed,
            schedule: Schedule::draw(voters, seed, RUN_MS),
            stale_reads: false,
        }
    }
}

/// What one run produced.
#[derive(Debug)]
struct Run {
    histories: BTreeMap<&'static str, Vec<Call<RegOp, RegRet>>>,
    /// Each member's registry at the end, as (service, id, address) triples.
    finals: BTreeMap<u8, Vec<(String, String, String)>>,
    /// The highest term any member reached: how many elections the faults caused.
    term: u64,
    /// What the sidecars held of the mesh-wide limit.
    quota: Quota,
}

/// The shares the simulated sidecars hold, each with the moment its grant runs out (simulated
/// microseconds).
#[derive(Debug, Default)]
struct Quota {
    held: BTreeMap<usize, (u64, u64)>,
    /// The most ever in force at once, in thousandths of a request per second.
    worst: u64,
    /// Refreshes answered.
    answered: usize,
}

impl Quota {
    /// Records `share` as what sidecar `me` enforces until `until` (the newest answer replaces
    /// the one before), and the sum of the unexpired shares: it can only grow at such a moment.
    fn hold(&mut self, me: usize, share: u64, until: u64) {
        self.answered += 1;
        self.held.insert(me, (share, until));
        let now = now_us();
        let in_force = self
            .held
            .values()
            .filter(|(_, until)| *until > now)
            .map(|(s, _)| s)
            .sum();
        self.worst = self.worst.max(in_force);
    }
}

impl Run {
    fn answered(&self) -> usize {
        self.histories
            .values()
            .flatten()
            .filter(|c| c.returned.is_some())
            .count()
    }

    fn unknown(&self) -> usize {
        self.histories
            .values()
            .flatten()
            .filter(|c| c.returned.is_none())
            .count()
    }

    /// The services whose history is not linearizable.
    fn violations(&self) -> Vec<&'static str> {
        self.histories
            .iter()
            .filter(|(_, h)| !linearizability::check(&Registry, h))
            .map(|(s, _)| *s)
            .collect()
    }

    fn diverged(&self) -> bool {
        let mut finals = self.finals.values();
        match finals.next() {
            Some(first) => finals.any(|f| f != first),
            None => false,
        }
    }

    /// A compact, comparable account of the run.
    fn fingerprint(&self) -> String {
        format!(
            "{:?} {:?} {:?}",
            self.histories, self.finals, self.quota.held
        )
    }
}

/// A registry operation on one service, as a client issued it.
#[derive(Clone, Debug, PartialEq)]
enum RegOp {
    Register { id: &'static str, address: String },
    Deregister { id: &'static str },
    Read,
}

/// What the group answered.
#[derive(Clone, Debug, PartialEq)]
enum RegRet {
    Registered,
    Deregistered { existed: bool },
    Read(BTreeMap<String, String>),
}

/// The sequential specification of one service: instance id → address.
struct Registry;

impl Model for Registry {
    type State = BTreeMap<&'static str, String>;
    type Op = RegOp;
    type Ret = RegRet;

    fn init(&self) -> Self::State {
        BTreeMap::new()
    }

    fn step(&self, s: &Self::State, op: &RegOp, ret: Option<&RegRet>) -> Option<Self::State> {
        match (op, ret) {
            (RegOp::Register { id, address }, None | Some(RegRet::Registered)) => {
                let mut next = s.clone();
                next.insert(id, address.clone());
                Some(next)
            }
            (RegOp::Deregister { id }, ret) => {
                let fits = match ret {
                    None => true,
                    Some(RegRet::Deregistered { existed }) => *existed == s.contains_key(id),
                    Some(_) => false,
                };
                fits.then(|| {
                    let mut next = s.clone();
                    next.remove(id);
                    next
                })
            }
            (RegOp::Read, None) => Some(s.clone()),
            (RegOp::Read, Some(RegRet::Read(seen))) => {
                let same =
                    seen.len() == s.len() && s.iter().all(|(id, a)| seen.get(*id) == Some(a));
                same.then(|| s.clone())
            }
            _ => None,
        }
    }
}

type Histories = Rc<RefCell<BTreeMap<&'static str, Vec<Call<RegOp, RegRet>>>>>;
/// The running members (a crashed member keeps its last entry until it restarts).
type Members = Rc<RefCell<BTreeMap<u8, Node>>>;

fn now_us() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_micros() as u64)
}

/// Runs one case to its end.
fn simulate(case: &Case) -> Result<Run, String> {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_millis(LIMIT_MS + 5_000))
        .tick_duration(Duration::from_millis(TICK_MS))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(schedule::BASE_LATENCY_MS))
        .repair_rate(0.3)
        .tcp_capacity(1 << 16)
        .rng_seed(case.seed)
        .build();

    let ids: Vec<u8> = (1..=case.voters).collect();
    let voters: BTreeMap<u64, String> = ids.iter().map(|&i| (i as u64, addr(i))).collect();
    let mut draw = fastrand::Rng::with_seed(case.seed);
    // Distinct fixed election timeouts, their order drawn from the seed.
    let mut slots: Vec<u64> = (0..case.voters as u64).map(|k| 150 + 60 * k).collect();
    draw.shuffle(&mut slots);

    let members: Members = Rc::default();
    for (&id, &min) in ids.iter().zip(&slots) {
        let settings = Settings {
            node_id: id as u64,
            data_dir: Default::default(),
            voters: voters.clone(),
            heartbeat: Duration::from_millis(50),
            election: (Duration::from_millis(min), Duration::from_millis(min + 1)),
            snapshot_every: 25,
        };
        let disk = Disk::default();
        let members = members.clone();
        sim.host(host(id), move || {
            member(id, settings.clone(), disk.clone(), members.clone())
        });
    }

    let histories: Histories = Rc::default();
    for c in 0..CLIENTS {
        let seed = case.seed ^ ((c as u64 + 1) << 32);
        sim.client(
            format!("c{c}"),
            client(c, seed, ids.clone(), histories.clone(), case.stale_reads),
        );
    }
    sim.client("final", final_reads(ids.clone(), histories.clone()));
    let quota: Rc<RefCell<Quota>> = Rc::default();
    for me in 0..SIDECARS {
        let seed = case.seed ^ ((me as u64 + 1) << 40);
        sim.client(
            format!("s{me}"),
            sidecar(me, seed, ids.clone(), quota.clone()),
        );
    }

    let mut pending = case.schedule.events.iter().peekable();
    let mut crashed: Vec<u8> = Vec::new();
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while let Some((_, fault)) = pending.next_if(|(at, _)| *at <= now) {
            let leader = leader(&members, &crashed);
            schedule::apply(&mut sim, &ids, fault, leader, &mut crashed);
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("the simulation failed: {e}")),
        }
    }
    if !crashed.is_empty() {
        schedule::apply(&mut sim, &ids, &Fault::Heal, None, &mut crashed);
    }
    // Let every member apply everything before comparing them.
    let mut finals = BTreeMap::new();
    for _ in 0..10_000 {
        finals = members
            .borrow()
            .iter()
            .map(|(id, n)| (*id, registry_of(&n.state.borrow())))
            .collect();
        let applied: Vec<_> = members
            .borrow()
            .values()
            .map(|n| n.state.borrow().applied)
            .collect();
        if applied.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        if let Err(e) = sim.step() {
            return Err(format!("the simulation failed: {e}"));
        }
    }
    let histories = histories.take();
    let term = members
        .borrow()
        .values()
        .map(|n| n.raft.metrics().borrow().current_term)
        .max()
        .unwrap_or(0);
    let quota = quota.take();
    Ok(Run {
        histories,
        finals,
        term,
        quota,
    })
}

/// The member a live member believes leads, if it is live itself.
fn leader(members: &Members, crashed: &[u8]) -> Option<u8> {
    let members = members.borrow();
    members
        .iter()
        .filter(|(id, _)| !crashed.contains(id))
        .find_map(|(_, n)| n.raft.metrics().borrow().current_leader)
        .and_then(|l| u8::try_from(l).ok())
        .filter(|l| !crashed.contains(l))
}

fn registry_of(state: &State) -> Vec<(String, String, String)> {
    state
        .registry
        .services()
        .flat_map(|(name, s)| {
            s.instances.values().map(move |i| {
                (
                    name.to_owned(),
                    i.registration.id.clone(),
                    i.registration.address.clone(),
                )
            })
        })
        .collect()
}

/// A member's software, started again from its disk after every simulated crash.
async fn member(
    id: u8,
    settings: Settings,
    disk: Disk,
    members: Members,
) -> Result<(), Box<dyn std::error::Error>> {
    if disk.open.swap(true, Ordering::SeqCst) {
        return Err(format!("n{id} restarted while its crashed database was still open").into());
    }
    let (log, machine) = store::open_inline(disk).await?;
    let tasks = Tasks::new();
    let metrics = crate::telemetry::metrics::Metrics::new()?.mesh;
    let node = Node::run(&settings, log, machine, SimNet, metrics, &tasks).await?;
    members.borrow_mut().insert(id, node.clone());
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let init = node.clone();
    tokio::spawn(async move {
        let _ = init.initialize(&settings).await;
    });
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(server::connection(stream, node.context()));
    }
}

/// How an operation ended, as far as its client can tell.
enum Ended {
    /// It took effect and answered this.
    Answered(RegRet),
    /// It certainly did not take effect (refused before it was proposed).
    Refused,
    /// It may have taken effect, or may yet.
    Unknown,
}

/// A client: operations on random services, sent to random members, until [`RUN_MS`].
async fn client(
    me: usize,
    seed: u64,
    ids: Vec<u8>,
    histories: Histories,
    stale_reads: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut serial = 0u32;
    while now_us() < RUN_MS * 1_000 {
        let service = SERVICES[rng.usize(..SERVICES.len())];
        let id = IDS[rng.usize(..IDS.len())];
        let target = ids[rng.usize(..ids.len())];
        let op = match rng.u8(..10) {
            0..=3 => {
                serial += 1;
                RegOp::Register {
                    id,
                    address: format!("10.{me}.{}.{}", serial / 256, serial % 256),
                }
            }
            4..=5 => RegOp::Deregister { id },
            _ => RegOp::Read,
        };
        let invoked = now_us();
        let outcome = perform(target, service, &op, stale_reads).await;
        let returned = match outcome {
            Ended::Answered(ret) => Some((now_us(), ret)),
            Ended::Unknown if op != RegOp::Read => None,
            // A read that failed, or a write that was refused, constrains nothing.
            Ended::Unknown | Ended::Refused => {
                tokio::time::sleep(Duration::from_millis(rng.u64(5..50))).await;
                continue;
            }
        };
        histories
            .borrow_mut()
            .entry(service)
            .or_default()
            .push(Call {
                invoked,
                returned,
                op,
            });
        tokio::time::sleep(Duration::from_millis(rng.u64(0..30))).await;
    }
    Ok(())
}

/// A sidecar refreshing its share of one mesh-wide limit until [`RUN_MS`], its demand jumping
/// at random, through random members (following redirects), as `allowance.rs` does.
async fn sidecar(
    me: usize,
    seed: u64,
    ids: Vec<u8>,
    quota: Rc<RefCell<Quota>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut holding = 0;
    while now_us() < RUN_MS * 1_000 {
        let refresh = Refresh {
            client: format!("s{me}"),
            holding,
            limits: vec![LimitDemand {
                name: "api".into(),
                rate: QUOTA_RATE,
                offered: rng.f64() * 2.0 * QUOTA_RATE,
            }],
            wait_ms: 500,
            hints: Vec::new(),
            hints_seen: 0,
            hints_epoch: 0,
            checks: Vec::new(),
            verdicts: Vec::new(),
            checks_seen: 0,
        };
        let body = serde_json::to_vec(&refresh)?;
        let asked = now_us();
        let mut to = addr(ids[rng.usize(..ids.len())]);
        let mut path = "/v1/quota/refresh".to_owned();
        let mut granted = None;
        for _ in 0..4 {
            let answer =
                tokio::time::timeout(ATTEMPT, exchange(&to, Method::POST, &path, body.clone()))
                    .await;
            match answer {
                Ok(Ok((StatusCode::OK, _, _, bytes))) => {
                    granted = serde_json::from_slice::<Granted>(&bytes).ok();
                    break;
                }
                Ok(Ok((StatusCode::TEMPORARY_REDIRECT, Some(location), _, _))) => {
                    let Some((host, rest)) = location
                        .strip_prefix("http://")
                        .and_then(|l| l.find('/').map(|i| (l[..i].to_owned(), l[i..].to_owned())))
                    else {
                        break;
                    };
                    to = host;
                    path = rest;
                }
                _ => break,
            }
        }
        match granted {
            Some(g) => {
                holding = g.index;
                let share = g
                    .limits
                    .first()
                    .and_then(|l| l.share)
                    .map_or(0, quota::milli);
                let until = asked + quota::GRANT.as_micros() as u64;
                quota.borrow_mut().hold(me, share, until);
                tokio::time::sleep(Duration::from_millis(rng.u64(0..100))).await;
            }
            None => tokio::time::sleep(Duration::from_millis(rng.u64(50..150))).await,
        }
    }
    Ok(())
}

/// After the heal: a linearizable read of every service, retried until one is answered, so an
/// acknowledged write that was lost shows up as a violation.
async fn final_reads(ids: Vec<u8>, histories: Histories) -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::sleep(Duration::from_millis(RUN_MS + SETTLE_MS)).await;
    for (k, service) in SERVICES.iter().enumerate() {
        let mut attempt = 0;
        loop {
            if now_us() > LIMIT_MS * 1_000 {
                return Err(format!(
                    "no linearizable read of {service} was answered after the heal"
                )
                .into());
            }
            let target = ids[(k + attempt) % ids.len()];
            attempt += 1;
            let invoked = now_us();
            if let Ended::Answered(ret) = perform(target, service, &RegOp::Read, false).await {
                histories
                    .borrow_mut()
                    .entry(service)
                    .or_default()
                    .push(Call {
                        invoked,
                        returned: Some((now_us(), ret)),
                        op: RegOp::Read,
                    });
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Sends one operation to `target`, following redirects to the leader.
async fn perform(target: u8, service: &str, op: &RegOp, stale_reads: bool) -> Ended {
    let (method, mut path, body) = match op {
        RegOp::Register { id, address } => {
            let reg = Registration {
                service: service.to_owned(),
                id: (*id).to_owned(),
                address: address.clone(),
                port: 80,
                weight: 1,
                metadata: BTreeMap::new(),
                // Longer than any run: the model has no expiry.
                ttl_ms: 3_600_000,
            };
            let body = serde_json::to_vec(&reg).unwrap_or_default();
            (Method::POST, "/v1/registry/register".to_owned(), body)
        }
        RegOp::Deregister { id } => {
            let body = serde_json::to_vec(&serde_json::json!({"service": service, "id": id}))
                .unwrap_or_default();
            (Method::POST, "/v1/registry/deregister".to_owned(), body)
        }
        RegOp::Read if stale_reads => (Method::GET, format!("/v1/registry/{service}"), Vec::new()),
        RegOp::Read => (
            Method::GET,
            format!("/v1/registry/{service}?consistent=true"),
            Vec::new(),
        ),
    };
    let mut to = addr(target);
    for _ in 0..4 {
        let answer =
            tokio::time::timeout(ATTEMPT, exchange(&to, method.clone(), &path, body.clone())).await;
        let (status, location, reason, bytes) = match answer {
            Ok(Ok(a)) => a,
            _ => return Ended::Unknown,
        };
        match status {
            StatusCode::OK => return decode(op, service, &bytes),
            StatusCode::TEMPORARY_REDIRECT => {
                let Some(rest) = location.as_deref().and_then(|l| l.strip_prefix("http://")) else {
                    return Ended::Refused;
                };
                let Some(slash) = rest.find('/') else {
                    return Ended::Refused;
                };
                to = rest[..slash].to_owned();
                path = rest[slash..].to_owned();
            }
            // Turned away before the write was proposed.
            StatusCode::SERVICE_UNAVAILABLE
                if matches!(reason.as_deref(), Some("mesh_busy" | "mesh_no_leader")) =>
            {
                return Ended::Refused
            }
            _ => return Ended::Unknown,
        }
    }
    Ended::Refused
}

fn decode(op: &RegOp, service: &str, bytes: &[u8]) -> Ended {
    match op {
        RegOp::Read => match serde_json::from_slice::<ReadAnswer>(bytes) {
            Ok(a) => Ended::Answered(RegRet::Read(
                a.services
                    .get(service)
                    .map(|s| {
                        s.instances
                            .iter()
                            .map(|i| (i.registration.id.clone(), i.registration.address.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            )),
            Err(_) => Ended::Unknown,
        },
        _ => match serde_json::from_slice::<WriteAnswer>(bytes) {
            Ok(WriteAnswer {
                applied: Applied::Registry(Outcome::Registered { .. }),
                ..
            }) => Ended::Answered(RegRet::Registered),
            Ok(WriteAnswer {
                applied: Applied::Registry(Outcome::Deregistered { existed }),
                ..
            }) => Ended::Answered(RegRet::Deregistered { existed }),
            _ => Ended::Unknown,
        },
    }
}

type Exchanged = (StatusCode, Option<String>, Option<String>, Bytes);

/// One request on a fresh connection (a connection cut by a partition never recovers in the
/// simulated network, so none is kept).
async fn exchange(
    to: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<Exchanged, Box<dyn std::error::Error>> {
    let stream = turmoil::net::TcpStream::connect(to).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{to}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let location = header("location");
    let reason = header("x-outrigger-error");
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, location, reason, bytes))
}

/// Failing schedules kept as regression cases: `case voters=N seed=S`, then the schedule.
const REGRESSIONS: &str = include_str!("regressions.txt");

fn regressions() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut current: Option<(u8, u64, String)> = None;
    let finish = |current: Option<(u8, u64, String)>, cases: &mut Vec<Case>| {
        if let Some((voters, seed, text)) = current {
            match text.parse() {
                Ok(schedule) => cases.push(Case {
                    voters,
                    seed,
                    schedule,
                    stale_reads: false,
                }),
                Err(e) => panic!("regressions.txt, case seed={seed}: {e}"),
            }
        }
    };
    for line in REGRESSIONS.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(head) = line.strip_prefix("case ") {
            finish(current.take(), &mut cases);
            let field = |name: &str| {
                head.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("regressions.txt: {name}= missing in {line:?}"))
            };
            current = Some((field("voters") as u8, field("seed"), String::new()));
        } else if let Some((_, _, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    finish(current, &mut cases);
    cases
}

/// Runs `case` and says what is wrong with it, if anything, in a form that can be pasted into
/// `regressions.txt`.
fn verdict(case: &Case) -> Result<Run, String> {
    let run = simulate(case)?;
    let bad = run.violations();
    let mut problems = Vec::new();
    if !bad.is_empty() {
        problems.push(format!("not linearizable: {bad:?}"));
    }
    if run.diverged() {
        problems.push(format!("members diverged: {:?}", run.finals));
    }
    if run.quota.worst > quota::milli(QUOTA_RATE) {
        problems.push(format!(
            "the sidecars' unexpired shares added up to {:.3}/s, over the limit's {QUOTA_RATE}/s",
            run.quota.worst as f64 / quota::MILLI
        ));
    }
    if run.finals.len() != usize::from(case.voters) {
        problems.push(format!("only {} members ran", run.finals.len()));
    }
    if problems.is_empty() {
        Ok(run)
    } else {
        Err(format!(
            "{}\ncase voters={} seed={}\n{}",
            problems.join("; "),
            case.voters,
            case.seed,
            case.schedule
        ))
    }
}

/// Seeds each simulation test runs unless `OUTRIGGER_SIM_SEEDS` says otherwise.
const SEEDS_PER_TEST: u64 = 50;

/// The seeds of one test: `OUTRIGGER_SIM_SEED` alone, or the `block`-th run of
/// `OUTRIGGER_SIM_SEEDS` (default [`SEEDS_PER_TEST`]) seeds after `base`, so the tests of one
/// group size never share a seed whatever the count.
fn seeds(base: u64, block: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("OUTRIGGER_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("OUTRIGGER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_PER_TEST);
    let first = base + block * count;
    (first..first + count).collect()
}

fn run_seeds(voters: u8, seeds: &[u64]) {
    let mut failures = Vec::new();
    let (mut answered, mut unknown, mut terms, mut refreshes, mut worst) = (0, 0, 0, 0, 0);
    for &seed in seeds {
        match verdict(&Case::drawn(voters, seed)) {
            Ok(run) => {
                answered += run.answered();
                unknown += run.unknown();
                terms += run.term;
                refreshes += run.quota.answered;
                worst = worst.max(run.quota.worst);
            }
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{} seeds, {voters} voters: {answered} answered operations, {unknown} with unknown outcome, {:.1} terms per run, {refreshes} share refreshes answered (at most {:.1}/s of {QUOTA_RATE}/s in force), {} failed",
        seeds.len(),
        terms as f64 / seeds.len().max(1) as f64,
        worst as f64 / quota::MILLI,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    // The default run: 100 seeds for each group size, split so the test harness runs them on
    // every core. Five-voter seeds start at a million.
    #[test]
    fn three_voters_stay_linearizable_under_faults_first_block() {
        run_seeds(3, &seeds(0, 0));
    }

    #[test]
    fn three_voters_stay_linearizable_under_faults_second_block() {
        run_seeds(3, &seeds(0, 1));
    }

    #[test]
    fn five_voters_stay_linearizable_under_faults_first_block() {
        run_seeds(5, &seeds(1_000_000, 0));
    }

    #[test]
    fn five_voters_stay_linearizable_under_faults_second_block() {
        run_seeds(5, &seeds(1_000_000, 1));
    }

    #[test]
    fn kept_failing_schedules_now_pass() {
        for case in regressions() {
            if let Err(e) = verdict(&case) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn a_seed_replays_to_the_same_history() {
        let case = Case::drawn(3, 7);
        let first = simulate(&case).map(|r| r.fingerprint());
        let second = simulate(&case).map(|r| r.fingerprint());
        assert!(first.is_ok(), "{first:?}");
        assert_eq!(first, second);
    }

    /// The negative control: reads served from any member's local state, stale on a member cut
    /// off from the leader, presented as linearizable. The checker must refuse such histories.
    #[test]
    fn the_checker_catches_stale_reads() {
        let caught = (0..10)
            .filter(|&seed| {
                let mut case = Case::drawn(3, 500 + seed);
                case.stale_reads = true;
                simulate(&case).is_ok_and(|run| !run.violations().is_empty())
            })
            .count();
        assert!(caught > 0, "no stale read was caught in 10 runs");
        eprintln!("stale reads caught in {caught} of 10 runs");
    }
}
