//! The composition root: builds the running proxy from a config, applies reloads, owns shutdown.
//!
//! A reload is all-or-nothing: the new config is validated, its clusters and route tables are
//! compiled and every new socket is bound before anything live changes. Only then are listener
//! states swapped (requests in flight keep the snapshot they started with), new accept loops
//! started and removed ones told to drain.
//!
//! Every task runs supervised, in one of three groups: the listeners and their connections
//! (serving), the control tasks (discovery, health checks, certificate and config watches, each
//! cluster's follower), and the admin server. Shutdown stops them in that order: stop accepting
//! and drain connections within `drain_timeout`; (the mesh will hand off leadership here); stop
//! the control tasks and wait for them; stop the admin server last, so `/ready` says `draining`
//! throughout; (the mesh will flush its store here). The process exits after all have ended.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::config::mesh::{MeshConfig, Role};
use crate::control::config::{self, ClusterConfig, ConfigErrors, ListenerConfig, Loaded};
use crate::control::discovery::registry::Registry;
use crate::control::mesh::allowance::Allowances;
use crate::control::mesh::checks::Coordination;
use crate::control::mesh::client::MeshClient;
use crate::control::mesh::hints;
use crate::control::mesh::node::{Node, Settings};
use crate::control::mesh::registrar::Registrar;
use crate::control::mesh::{self, network::Tcp};
use crate::control::{discovery, health};
use crate::proxy::cluster::Cluster;
use crate::proxy::listener::{self, ListenerKind, ListenerState, Running};
use crate::proxy::resilience::load_shed::Limiter;
use crate::proxy::router::{RouteTable, UnknownCluster};
use crate::proxy::workers::Workers;
use crate::rng::Rng;
use crate::tasks::Tasks;
use crate::telemetry::admin::{self, Summary, View};
use crate::telemetry::metrics::http::NONE;
use crate::telemetry::metrics::{ConfigMetrics, Live, Metrics};
use crate::tls::{self, LoadError, ServerMaterial};
use crate::watch;

/// Health verdicts a cluster's follower may have queued before the checker waits.
const VERDICT_QUEUE: usize = 256;
/// How long shutdown waits for the control tasks and the admin server once they are told to stop.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A failure to start or to apply a config.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A socket could not be bound.
    #[error("cannot bind {what} on {address}: {source}")]
    Bind {
        /// Which listener (or the admin server).
        what: String,
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file was invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A compiled route referred to a missing cluster.
    #[error(transparent)]
    Compile(#[from] UnknownCluster),
    /// A TLS file named by the config could not be used.
    #[error(transparent)]
    Tls(#[from] LoadError),
    /// The metrics registry could not be built.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The mesh member could not start.
    #[error(transparent)]
    Mesh(Box<mesh::node::StartError>),
    /// A reload changed a setting that takes effect only at start.
    #[error("{0} takes effect only at start: restart the sidecar to change it")]
    NeedsRestart(&'static str),
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new config is live, with this version.
    Applied(u64),
    /// The file has not changed since it was last read.
    Unchanged,
    /// The proxy runs on the embedded config: there is nothing to reload.
    NoFile,
    /// The file was rejected; the previous config keeps serving.
    Rejected(String),
}

/// The config in force and what it was compiled into, as the admin server shows it.
pub struct Active {
    /// The validated config and its source.
    pub loaded: Loaded,
    /// Grows by one with each applied config; the first is 1.
    pub version: u64,
    /// When it was applied.
    pub applied_at: SystemTime,
    /// Each listener with the address it actually bound.
    pub listeners: Vec<BoundListener>,
    /// The running clusters, in config order.
    pub clusters: Vec<Arc<Cluster>>,
}

/// A listener and its bound address.
pub struct BoundListener {
    /// Listener name.
    pub name: String,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// Address in the config.
    pub configured: SocketAddr,
    /// Address bound.
    pub bound: SocketAddr,
}

/// State only the reload path touches; behind an async lock so reloads never interleave.
struct Control {
    listeners: HashMap<String, Running>,
    clusters: HashMap<String, Arc<Cluster>>,
    last_seen_hash: String,
}

/// Everything the running proxy shares between its tasks and the admin server.
pub struct Shared {
    /// The metrics registry.
    pub metrics: Metrics,
    config_metrics: ConfigMetrics,
    /// The config in force.
    pub active: ArcSwap<Active>,
    /// The error of the most recent reload, if it failed.
    pub last_error: ArcSwapOption<String>,
    /// The latest reloads, newest last, for the admin page: a rejected one stays listed after
    /// a later one succeeds and clears `last_error`.
    reloads: std::sync::Mutex<std::collections::VecDeque<ReloadRecord>>,
    draining: AtomicBool,
    config_path: Option<PathBuf>,
    control: Mutex<Control>,
    /// Stops the accept loops; their connections drain.
    shutdown: CancellationToken,
    /// Listeners and their connections.
    serving: TaskTracker,
    /// The threads that serve them.
    workers: Arc<Workers>,
    /// Discovery, health checks, watches and cluster followers.
    background: Tasks,
    /// The admin server and its connections.
    admin: Tasks,
    admin_addr: SocketAddr,
    rng: Rng,
    /// This sidecar's mesh member, if it is a voter or learner.
    mesh: Option<Member>,
    /// Where `registry` clusters read the registry (the member's own state, or the members').
    registry: Option<Registry>,
    /// Keeps the local application registered, if `mesh.register` is set.
    registrar: Option<Registrar>,
    /// This sidecar's shares of mesh-wide rate limits, when it has a `mesh:` section.
    allowances: Option<Arc<Allowances>>,
    /// Failure hints, when the mesh shares them.
    hints: Option<Arc<hints::Exchange>>,
    /// Coordinated health checking, when there is a mesh.
    coordination: Option<Arc<Coordination>>,
}

/// A running mesh member and the tasks that serve it.
struct Member {
    node: Node,
    tasks: Tasks,
    /// The admin port's way into the group: this member first, then where it redirects.
    client: MeshClient,
}

/// How long an operator's call through the admin port may wait for the group (a membership
/// change commits in two steps).
const MESH_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What compiling a config needs besides the config.
struct Build<'a> {
    metrics: &'a Metrics,
    registry: Option<&'a Registry>,
    allowances: Option<&'a Allowances>,
    hints: Option<&'a Arc<hints::Exchange>>,
    coordination: Option<&'a Arc<Coordination>>,
    rng: &'a Rng,
    background: &'a Tasks,
    shutdown: &'a CancellationToken,
    serving: &'a TaskTracker,
    workers: &'a Workers,
}

/// A running proxy.
#[derive(Clone)]
pub struct App {
    shared: Arc<Shared>,
}

impl App {
    /// Binds the admin server and every listener of `loaded`, then starts serving. With a
    /// `config_path`, the file is watched and reloaded on change. Randomness (jitter, hedging,
    /// faults) is seeded from the operating system.
    pub async fn start(loaded: Loaded, config_path: Option<PathBuf>) -> Result<App, AppError> {
        Self::start_with(loaded, config_path, Rng::from_entropy()).await
    }

    /// As [`App::start`], with every random draw following from `rng`.
    pub async fn start_with(
        loaded: Loaded,
        config_path: Option<PathBuf>,
        rng: Rng,
    ) -> Result<App, AppError> {
        Self::start_on(loaded, config_path, rng, Arc::new(Workers::ambient())).await
    }

    /// As [`App::start_with`], serving connections on `workers` rather than on the caller's
    /// runtime. The caller stops the workers once [`App::shutdown`] has returned.
    pub async fn start_on(
        loaded: Loaded,
        config_path: Option<PathBuf>,
        rng: Rng,
        workers: Arc<Workers>,
    ) -> Result<App, AppError> {
        let metrics = Metrics::new()?;
        let admin_addr = loaded.config.admin_address;
        let bind_error = |source| AppError::Bind {
            what: "the admin server".into(),
            address: admin_addr,
            source,
        };
        let admin_socket = TcpListener::bind(admin_addr).await.map_err(bind_error)?;
        let admin_addr = admin_socket.local_addr().map_err(bind_error)?;
        let mut control = Control {
            listeners: HashMap::new(),
            clusters: HashMap::new(),
            last_seen_hash: loaded.hash.clone(),
        };
        let (shutdown, serving) = (CancellationToken::new(), TaskTracker::new());
        let (background, admin) = (Tasks::new(), Tasks::new());
        // Every call to the group (Raft's own, the registrar's, discovery's, the admin port's)
        // shares one client TLS config, rotated as its files change.
        let mesh_tls = match loaded.config.mesh.as_ref().and_then(|m| m.tls.as_ref()) {
            Some(t) => Some(Arc::new(tls::ClientTls::new(
                &t.client,
                None,
                true,
                "mesh",
                metrics.control.cluster_cert("mesh"),
                &background,
            )?)),
            None => None,
        };
        // The member starts first: `registry` clusters read from it as they are built.
        let (mesh, registry) = match loaded.config.mesh.clone() {
            Some(c) if c.role != Role::Client => {
                let member = start_member(c, &metrics, mesh_tls.clone(), &background).await?;
                let registry = Registry::Local(member.node.state.clone());
                (Some(member), Some(registry))
            }
            Some(c) => {
                let members = c.members.values().cloned().collect();
                let client = MeshClient::new(members, mesh_tls.clone());
                (None, Some(Registry::Remote(Box::new(client))))
            }
            None => (None, None),
        };
        // Shares of mesh-wide rate limits, refreshed from the group in the background, and
        // failure hints exchanged on the same refreshes.
        let (hints, hints_in) = match loaded.config.mesh.as_ref() {
            Some(m) if m.failure_hints => {
                let (exchange, rx) = hints::Exchange::new(&metrics.mesh);
                (Some(exchange), Some(rx))
            }
            _ => (None, None),
        };
        // One id for this sidecar in every refresh: its shares, hints and coordinated checks.
        let sidecar_id = format!("{:016x}", rng.u64());
        let coordination = loaded
            .config
            .mesh
            .as_ref()
            .map(|_| Coordination::new(sidecar_id.clone()));
        let allowances = loaded.config.mesh.as_ref().map(|m| {
            let allowances =
                Allowances::new(metrics.mesh.clone(), hints.clone(), coordination.clone());
            let members = m.members.values().cloned().collect();
            allowances.start(
                MeshClient::new(members, mesh_tls.clone()),
                sidecar_id.clone(),
                rng.fork(),
                &background,
            );
            allowances
        });
        let build = Build {
            metrics: &metrics,
            registry: registry.as_ref(),
            allowances: allowances.as_deref(),
            hints: hints.as_ref(),
            coordination: coordination.as_ref(),
            rng: &rng,
            background: &background,
            shutdown: &shutdown,
            serving: &serving,
            workers: &workers,
        };
        let registrar = loaded.config.mesh.as_ref().and_then(|m| {
            let cfg = m.register.clone()?;
            let members = m.members.values().cloned().collect();
            let client = MeshClient::new(members, mesh_tls.clone());
            let metrics = metrics
                .control
                .health(&format!("register:{}", cfg.registration.service));
            Some(Registrar::start(
                cfg,
                client,
                metrics,
                rng.fork(),
                &background,
            ))
        });
        let active = compile_and_swap(&build, &mut control, loaded, 1).await?;
        let config_metrics = metrics.control.config();
        config_metrics.set_version(1);
        let shared = Arc::new(Shared {
            metrics,
            config_metrics,
            active: ArcSwap::from_pointee(active),
            last_error: ArcSwapOption::empty(),
            reloads: std::sync::Mutex::default(),
            draining: AtomicBool::new(false),
            config_path,
            control: Mutex::new(control),
            shutdown,
            serving,
            workers,
            background,
            admin,
            admin_addr,
            rng,
            mesh,
            registry,
            registrar,
            allowances,
            hints,
            coordination,
        });
        if let Some(rx) = hints_in {
            shared
                .background
                .spawn("failure_hints", take_hints(Arc::downgrade(&shared), rx));
        }
        let view: Arc<dyn View> = Arc::new(AdminView(shared.clone()));
        let admin_tasks = shared.admin.clone();
        shared
            .admin
            .spawn("admin", admin::serve(admin_socket, view, admin_tasks));
        let app = App { shared };
        if let Some(path) = app.shared.config_path.clone() {
            app.watch(path);
        }
        Ok(app)
    }

    fn watch(&self, path: PathBuf) {
        let changes = match watch::watch(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot watch the config file; reload with SIGHUP");
                return;
            }
        };
        // A weak reference: the watch must not keep the proxy alive, and ends with it.
        let app = Arc::downgrade(&self.shared);
        self.shared.background.spawn("config_watch", async move {
            watch::on_change(changes, || {
                let app = app.upgrade().map(|shared| App { shared });
                async move {
                    if let Some(app) = app {
                        app.reload(false).await;
                    }
                }
            })
            .await;
        });
    }

    /// The admin server's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.shared.admin_addr
    }

    /// The bound address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .active
            .load()
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.bound)
    }

    /// The shared state, for tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Reads the config file again and applies it if it changed (or always, with `force`).
    pub async fn reload(&self, force: bool) -> ReloadOutcome {
        let Some(path) = &self.shared.config_path else {
            return ReloadOutcome::NoFile;
        };
        let mut control = self.shared.control.lock().await;
        let result = self.reload_locked(path, &mut control, force).await;
        let m = &self.shared.config_metrics;
        match result {
            Ok(Some(version)) => {
                m.reload(true, version);
                self.shared.last_error.store(None);
                self.shared.record_reload(Some(version), None);
                tracing::info!(version, path = %path.display(), "config reloaded");
                ReloadOutcome::Applied(version)
            }
            Ok(None) => {
                m.unchanged();
                ReloadOutcome::Unchanged
            }
            Err(e) => {
                m.reload(false, 0);
                let text = e.to_string();
                for line in text.lines() {
                    tracing::error!("config rejected, previous config stays: {line}");
                }
                self.shared.last_error.store(Some(Arc::new(text.clone())));
                self.shared.record_reload(None, Some(text.clone()));
                ReloadOutcome::Rejected(text)
            }
        }
    }

    async fn reload_locked(
        &self,
        path: &Path,
        control: &mut Control,
        force: bool,
    ) -> Result<Option<u64>, AppError> {
        let file = path.display().to_string();
        let text = match tokio::fs::read_to_string(path).await {
            Ok(text) => text,
            // Editors that save by rename leave a moment with no file; a missing file is never a
            // reason to change the running config, and the write that follows triggers a reload.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %file, "config file is missing; keeping the running config");
                return Ok(None);
            }
            Err(source) => return Err(AppError::Read { path: file, source }),
        };
        // Hash first: unchanged text (a touch, an event for the same bytes) is not parsed again.
        let hash = config::hash_text(&text);
        if !force && hash == control.last_seen_hash {
            return Ok(None);
        }
        control.last_seen_hash = hash;
        let loaded = config::parse_in(&file, &text, path.parent())?;
        if let Some(field) = restart_needed(
            self.shared.active.load().loaded.config.mesh.as_ref(),
            loaded.config.mesh.as_ref(),
        ) {
            return Err(AppError::NeedsRestart(field));
        }
        let version = self.shared.active.load().version + 1;
        let s = &self.shared;
        let build = Build {
            metrics: &s.metrics,
            registry: s.registry.as_ref(),
            allowances: s.allowances.as_deref(),
            hints: s.hints.as_ref(),
            coordination: s.coordination.as_ref(),
            rng: &s.rng,
            background: &s.background,
            shutdown: &s.shutdown,
            serving: &s.serving,
            workers: &s.workers,
        };
        let active = compile_and_swap(&build, control, loaded, version).await?;
        let live = live_names(&active.loaded.config);
        self.shared.active.store(Arc::new(active));
        let dropped = self.shared.metrics.forget_all_but(&live);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "metric series of removed listeners, routes and clusters dropped"
            );
        }
        Ok(Some(version))
    }

    /// Whether the proxy is ready for traffic. An `App` exists only once its config is loaded and
    /// its listeners are bound, so this is false only while draining.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Shuts down in order: stop accepting and let in-flight requests finish for up to
    /// `drain_timeout`; stop the control tasks and wait for them; stop the admin server and wait
    /// for it. Returns whether the connections drained in time.
    pub async fn shutdown(&self) -> bool {
        let s = &self.shared;
        let drain = s.active.load().loaded.config.drain_timeout;
        s.draining.store(true, Ordering::SeqCst);
        // Out of the registry first, so callers stop choosing this instance while it drains.
        if let Some(r) = &s.registrar {
            r.deregister(STOP_TIMEOUT).await;
        }
        tracing::info!(?drain, "draining");
        s.shutdown.cancel();
        s.serving.close();
        let drained = tokio::time::timeout(drain, s.serving.wait()).await.is_ok();
        if !drained {
            tracing::warn!(
                left = s.serving.len(),
                "drain timeout reached with connections still open"
            );
        }
        // openraft 0.9 cannot transfer leadership: a leader that stops promptly is the
        // shortest handover (the others elect within an election timeout). Raft stops first,
        // then its port; every store write was durable when it returned, so nothing is left to
        // flush once the store is dropped.
        if let Some(m) = &s.mesh {
            if let Err(e) = m.node.raft.shutdown().await {
                tracing::warn!(error = %e, "mesh member did not stop cleanly");
            }
            let before = m.tasks.running();
            m.tasks.cancel();
            if tokio::time::timeout(STOP_TIMEOUT, m.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    group = "mesh",
                    left = m.tasks.running(),
                    "tasks did not stop in time"
                );
            }
            tracing::info!(
                group = "mesh",
                ended = before,
                left = m.tasks.running(),
                "background tasks ended"
            );
        }
        for (group, tasks) in [("control", &s.background), ("admin", &s.admin)] {
            let before = tasks.running();
            tasks.cancel();
            if tokio::time::timeout(STOP_TIMEOUT, tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(group, left = tasks.running(), "tasks did not stop in time");
            }
            tracing::info!(
                group,
                ended = before,
                left = tasks.running(),
                "background tasks ended"
            );
        }
        drained
    }

    /// Tasks still running: (listeners and connections, control tasks, admin server).
    pub fn running_tasks(&self) -> (usize, usize, usize) {
        let s = &self.shared;
        (s.serving.len(), s.background.running(), s.admin.running())
    }
}

impl Shared {
    /// See [`App::is_ready`].
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    /// Keeps the outcome of a reload among the latest `RECENT_RELOADS`.
    fn record_reload(&self, version: Option<u64>, error: Option<String>) {
        let at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut list = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() == RECENT_RELOADS {
            list.pop_front();
        }
        list.push_back(ReloadRecord {
            at_unix,
            version,
            error,
        });
    }

    /// The active config, its version and hash, the bound listeners and the last reload error.
    fn config_json(&self) -> serde_json::Value {
        let active = self.active.load();
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
            "last_reload_error": self.last_error.load().as_deref(),
            "recent_reloads": self
                .reloads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .rev()
                .map(|r| json!({
                    "at_unix": r.at_unix,
                    "result": if r.error.is_some() { "rejected" } else { "applied" },
                    "version": r.version,
                    "error": r.error,
                }))
                .collect::<Vec<_>>(),
            "listeners": active.listeners.iter().map(|l| json!({
                "name": l.name,
                "protocol": l.protocol,
                "address": l.configured.to_string(),
                "bound_address": l.bound.to_string(),
            })).collect::<Vec<_>>(),
            "config": active.loaded.raw,
        })
    }
}

/// Reloads kept for the admin page.
const RECENT_RELOADS: usize = 10;

/// One reload's outcome.
struct ReloadRecord {
    at_unix: u64,
    /// The version it applied; `None` when rejected.
    version: Option<u64>,
    /// Why it was rejected.
    error: Option<String>,
}

/// The admin server's narrow view of the proxy: read-only, but for the operator calls it
/// forwards to the mesh group.
struct AdminView(Arc<Shared>);

impl View for AdminView {
    fn ready(&self) -> bool {
        self.0.is_ready()
    }

    fn metrics(&self) -> Vec<u8> {
        self.0.metrics.encode()
    }

    fn config(&self) -> serde_json::Value {
        self.0.config_json()
    }

    fn clusters(&self) -> serde_json::Value {
        let active = self.0.active.load();
        let clusters: Vec<_> = active.clusters.iter().map(|c| c.status()).collect();
        json!({ "clusters": clusters })
    }

    fn mesh(&self) -> Option<serde_json::Value> {
        self.0.mesh.as_ref().map(|m| m.status())
    }

    fn mesh_call(
        &self,
        method: http::Method,
        path: String,
        body: bytes::Bytes,
    ) -> Option<crate::telemetry::admin::MeshCall> {
        let client = self.0.mesh.as_ref()?.client.clone();
        Some(Box::pin(async move {
            match client.call(method, &path, body, MESH_CALL_TIMEOUT).await {
                Ok(answer) => answer,
                Err(e) => (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    bytes::Bytes::from(format!("{e}\n")),
                ),
            }
        }))
    }

    fn registry(&self) -> Option<serde_json::Value> {
        let m = self.0.mesh.as_ref()?;
        let state = m.node.state.borrow().clone();
        let services: serde_json::Map<String, serde_json::Value> = state
            .registry
            .services()
            .map(|(name, s)| {
                (
                    name.to_owned(),
                    json!({
                        "modified": s.modified,
                        "instances": s.instances.values().collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        Some(json!({
            "term": state.applied.map_or(0, |l| l.leader_id.term),
            "index": state.applied.map_or(0, |l| l.index),
            "services": services,
        }))
    }

    fn summary(&self) -> Summary {
        let active = self.0.active.load();
        Summary {
            version: active.version,
            file: active.loaded.file.clone(),
            hash: active.loaded.hash.clone(),
            listeners: active
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.protocol, l.bound))
                .collect(),
            last_error: self.0.last_error.load().as_deref().cloned(),
        }
    }
}

impl From<mesh::node::StartError> for AppError {
    fn from(e: mesh::node::StartError) -> Self {
        AppError::Mesh(Box::new(e))
    }
}

/// Starts this sidecar's mesh member: binds the mesh port, opens the store, joins (or forms) the
/// group.
async fn start_member(
    config: MeshConfig,
    metrics: &Metrics,
    client_tls: Option<Arc<tls::ClientTls>>,
    background: &Tasks,
) -> Result<Member, AppError> {
    let (Some(node_id), Some(listen), Some(data_dir)) =
        (config.node_id, config.listen, config.data_dir.clone())
    else {
        // Validation guarantees all three for voters and learners.
        return Err(AppError::NeedsRestart("mesh"));
    };
    let socket = TcpListener::bind(listen)
        .await
        .map_err(|source| AppError::Bind {
            what: "the mesh port".into(),
            address: listen,
            source,
        })?;
    let settings = Settings {
        node_id,
        data_dir,
        voters: config.members.clone(),
        heartbeat: config.heartbeat,
        election: (config.election_timeout, 2 * config.election_timeout),
        snapshot_every: config.snapshot_every,
    };
    let tasks = Tasks::new();
    let server_tls = match &config.tls {
        Some(t) => Some(Arc::new(tls::rotating_server(
            t.server.clone(),
            ServerMaterial::load(&t.server)?,
            "mesh",
            metrics.control.listener_cert("mesh"),
            background,
        ))),
        None => None,
    };
    let connect = Tcp::new(client_tls.clone());
    let node = Node::start(
        &settings,
        socket,
        server_tls,
        connect,
        metrics.mesh.clone(),
        &tasks,
    )
    .await?;
    tracing::info!(node_id, %listen, role = ?config.role, "mesh member started");
    // The admin port reaches the group through this member's advertised address: the name its
    // certificate carries under mesh.tls (validation sets it for every voter and learner).
    let own = config
        .advertise
        .clone()
        .unwrap_or_else(|| listen.to_string());
    let client = MeshClient::new(vec![own], client_tls);
    Ok(Member {
        node,
        tasks,
        client,
    })
}

impl Member {
    /// `/mesh`: who is in the group, who leads, where each log stands.
    fn status(&self) -> serde_json::Value {
        let m = self.node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<_> = membership.voter_ids().collect();
        let members: Vec<_> = membership
            .nodes()
            .map(|(id, node)| {
                json!({
                    "id": id,
                    "address": node.addr,
                    "role": if voters.contains(id) { "voter" } else { "learner" },
                })
            })
            .collect();
        let last = m.last_log_index.unwrap_or(0);
        let replication = m.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, matched)| {
                    let at = matched.map_or(0, |l| l.index);
                    (
                        id.to_string(),
                        json!({ "matched": at, "lag": last.saturating_sub(at) }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
        });
        json!({
            "node_id": m.id,
            "state": format!("{:?}", m.state).to_lowercase(),
            "term": m.current_term,
            "leader": m.current_leader,
            "last_log_index": m.last_log_index,
            "commit_index": self.node.committed.load(std::sync::atomic::Ordering::Relaxed),
            "applied_index": m.last_applied.map(|l| l.index),
            "snapshot_index": m.snapshot.map(|l| l.index),
            "purged_index": m.purged.map(|l| l.index),
            "millis_since_quorum_ack": m.millis_since_quorum_ack,
            "members": members,
            "replication": replication,
            "leases": self.node.leases.len(),
        })
    }
}

/// The first mesh setting a reload changed that only a restart can apply, if any.
fn restart_needed(running: Option<&MeshConfig>, new: Option<&MeshConfig>) -> Option<&'static str> {
    match (running, new) {
        (None, None) => None,
        (Some(a), Some(b)) => {
            if a.members != b.members {
                Some("mesh.members")
            } else if a.node_id != b.node_id {
                Some("mesh.node_id")
            } else if a.data_dir != b.data_dir {
                Some("mesh.data_dir")
            } else if a.role != b.role {
                Some("mesh.role")
            } else if a.listen != b.listen {
                Some("mesh.listen")
            } else if a.tls != b.tls {
                // Changed files rotate in place; moving to other files or identities does not.
                Some("mesh.tls")
            } else if (a.heartbeat, a.election_timeout, a.snapshot_every)
                != (b.heartbeat, b.election_timeout, b.snapshot_every)
            {
                Some("mesh timing (heartbeat, election_timeout, snapshot_every)")
            } else if a.failure_hints != b.failure_hints {
                Some("mesh.failure_hints")
            } else {
                None
            }
        }
        _ => Some("the mesh section"),
    }
}

/// Applies the failure hints other sidecars publish to every running cluster that sends to the
/// endpoint they name, until the proxy stops.
async fn take_hints(shared: std::sync::Weak<Shared>, mut rx: mpsc::Receiver<Vec<hints::Hint>>) {
    while let Some(batch) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let active = shared.active.load();
        for h in batch {
            let Ok(authority) = h.report.endpoint.parse::<http::uri::Authority>() else {
                continue;
            };
            let period = std::time::Duration::from_millis(h.left_ms);
            for c in &active.clusters {
                c.hint(&authority, period);
            }
        }
    }
}

/// Builds cluster `c` and starts what feeds it: its discovery source, its health checks (if
/// configured) and the follower that applies both. All of them end when the cluster is dropped.
fn start_cluster(c: &ClusterConfig, b: &Build<'_>) -> Result<Arc<Cluster>, LoadError> {
    let cluster = Arc::new(
        Cluster::new(
            c.clone(),
            b.metrics,
            b.rng.fork(),
            b.background.child(),
            b.workers.count(),
        )?
        .with_hints(b.hints.cloned()),
    );
    let own = cluster.tasks();
    let endpoints = discovery::start(
        &c.name,
        &c.upstream.discovery,
        b.registry,
        b.metrics,
        b.rng,
        own,
    );
    let (verdicts, verdicts_rx) = mpsc::channel(VERDICT_QUEUE);
    if let Some(cfg) = &c.upstream.health_check {
        // Coordinated: this sidecar probes the endpoints it owns, the others' verdicts come in
        // on the same channel as its own.
        let owner = match b.coordination {
            Some(coord) if cfg.coordinated => Some(coord.join(&c.name, verdicts.clone())),
            _ => None,
        };
        let target = health::Target {
            cluster: c.name.as_str().into(),
            endpoints: endpoints.clone(),
            owner,
            verdicts,
            tls: cluster.client.tls.clone(),
            metrics: b.metrics.control.health(&c.name),
            rng: b.rng.fork(),
        };
        health::start(cfg.clone(), target, own);
    }
    cluster.follow(endpoints, verdicts_rx);
    Ok(cluster)
}

/// Where a listener of the new config gets its socket from.
enum Socket {
    /// Take over this running listener (same address).
    Reuse(String),
    /// Freshly bound sockets, one per worker.
    Fresh(listener::Sockets),
}

/// Compiles `loaded`, binds what it needs, and only then swaps it into the running listeners.
async fn compile_and_swap(
    b: &Build<'_>,
    control: &mut Control,
    loaded: Loaded,
    version: u64,
) -> Result<Active, AppError> {
    let cfg = &loaded.config;
    let clusters: HashMap<String, Arc<Cluster>> = cfg
        .clusters
        .iter()
        .map(|c| {
            let cluster = match control.clusters.get(&c.name) {
                Some(old) if old.config == *c => old.clone(),
                _ => start_cluster(c, b)?,
            };
            Ok((c.name.clone(), cluster))
        })
        .collect::<Result<_, LoadError>>()?;
    let mut states = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        let previous = control.listeners.get(&l.name).map(|r| r.state.load_full());
        states.push(listener_state(
            l,
            &clusters,
            b,
            cfg.access_log,
            previous.as_deref(),
        )?);
    }

    let mut sockets = Vec::with_capacity(cfg.listeners.len());
    let mut taken: Vec<&str> = Vec::new();
    for l in &cfg.listeners {
        let by_name = control
            .listeners
            .get_key_value(&l.name)
            .filter(|(_, r)| r.configured == l.address);
        let by_address = || {
            control.listeners.iter().find(|(name, r)| {
                l.address.port() != 0
                    && r.configured == l.address
                    && !taken.contains(&name.as_str())
                    && !cfg
                        .listeners
                        .iter()
                        .any(|o| &o.name == *name && o.address == l.address)
            })
        };
        match by_name.or_else(by_address) {
            Some((name, _)) => {
                taken.push(name);
                sockets.push(Socket::Reuse(name.clone()));
            }
            None => {
                let socket = listener::bind(l.address, b.workers.count()).map_err(|source| {
                    AppError::Bind {
                        what: format!("listener `{}`", l.name),
                        address: l.address,
                        source,
                    }
                })?;
                sockets.push(Socket::Fresh(socket));
            }
        }
    }

    // Commit: nothing below can fail in a way that leaves a half-applied config.
    let mut running = HashMap::with_capacity(cfg.listeners.len());
    let mut bound = Vec::with_capacity(cfg.listeners.len());
    for ((l, state), socket) in cfg.listeners.iter().zip(states).zip(sockets) {
        let r = match socket {
            Socket::Reuse(name) => match control.listeners.remove(&name) {
                Some(r) => {
                    r.state.store(Arc::new(state));
                    r
                }
                None => continue,
            },
            Socket::Fresh(socket) => {
                match listener::spawn(
                    socket,
                    l.address,
                    state,
                    b.shutdown.child_token(),
                    b.serving,
                    b.workers,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(listener = %l.name, error = %e, "listener lost its socket");
                        continue;
                    }
                }
            }
        };
        tracing::info!(listener = %l.name, address = %r.local, "listening");
        bound.push(BoundListener {
            name: l.name.clone(),
            protocol: match l.kind {
                config::ListenerKind::Http { .. } => "http",
                config::ListenerKind::Tcp { .. } => "tcp",
            },
            configured: l.address,
            bound: r.local,
        });
        running.insert(l.name.clone(), r);
    }
    for (name, old) in control.listeners.drain() {
        tracing::info!(listener = %name, "listener removed; draining its connections");
        old.stop.cancel();
    }
    control.listeners = running;
    let ordered = cfg
        .clusters
        .iter()
        .filter_map(|c| clusters.get(&c.name).cloned())
        .collect();
    control.clusters = clusters;
    Ok(Active {
        loaded,
        version,
        applied_at: SystemTime::now(),
        listeners: bound,
        clusters: ordered,
    })
}

/// The listeners, routes and clusters of `config`, whose metric series a reload keeps.
fn live_names(config: &config::Config) -> Live {
    let mut live = Live::default();
    for l in &config.listeners {
        live.listeners.insert(l.name.clone());
        if let config::ListenerKind::Http { routes } = &l.kind {
            for r in routes {
                live.routes.insert((l.name.clone(), r.name.clone()));
            }
        }
    }
    live.clusters = config.clusters.iter().map(|c| c.name.clone()).collect();
    live
}

fn listener_state(
    l: &ListenerConfig,
    clusters: &HashMap<String, Arc<Cluster>>,
    b: &Build<'_>,
    access_log: bool,
    previous: Option<&ListenerState>,
) -> Result<ListenerState, AppError> {
    // The limiter keeps what it learnt across a reload unless its settings changed.
    let shed = l.load_shed.as_ref().map(|c| {
        let kept = previous
            .and_then(|p| p.shed.as_ref())
            .filter(|(old, _)| old == c)
            .map(|(_, limiter)| limiter.clone());
        let limiter = kept.unwrap_or_else(|| {
            Arc::new(Limiter::new(
                c.clone(),
                Some(b.metrics.resilience.load_shed(&l.name)),
            ))
        });
        (c.clone(), limiter)
    });
    let kind = match &l.kind {
        config::ListenerKind::Http { routes } => {
            let previous_routes = previous.and_then(|p| match &p.kind {
                ListenerKind::Http(table) => Some(table),
                ListenerKind::Tcp(_) => None,
            });
            ListenerKind::Http(RouteTable::build(
                &l.name,
                routes,
                clusters,
                shed.as_ref().map(|(_, limiter)| limiter),
                previous_routes,
                b.metrics,
                b.rng,
                b.allowances,
            )?)
        }
        config::ListenerKind::Tcp { cluster } => ListenerKind::Tcp(
            clusters
                .get(cluster)
                .cloned()
                .ok_or_else(|| UnknownCluster::new(&l.name, cluster))?,
        ),
    };
    let m = b.metrics;
    let listener_metrics = m.listener.resolve(
        &l.name,
        m.http.local_replies(&l.name),
        m.control.listener_cert(&l.name),
        b.workers.count(),
    );
    // Unchanged TLS settings keep their material and file watch; a rotation is not a reload.
    let tls = match &l.tls {
        Some(c) => {
            let kept = previous
                .and_then(|p| p.tls.as_ref())
                .filter(|(old, _)| old == c)
                .map(|(_, t)| t.clone());
            let tls = match kept {
                Some(t) => t,
                None => Arc::new(tls::rotating_server(
                    c.clone(),
                    ServerMaterial::load(c)?,
                    &l.name,
                    listener_metrics.cert.clone(),
                    b.background,
                )),
            };
            Some((c.clone(), tls))
        }
        None => None,
    };
    Ok(ListenerState {
        name: l.name.as_str().into(),
        kind,
        metrics: listener_metrics,
        unmatched: m.http.route(&l.name, NONE, NONE),
        access_log,
        header_read_timeout: l.header_read_timeout,
        idle_timeout: l.idle_timeout,
        shed,
        tls,
        limits: l.limits,
        request_id: l.request_id,
        rng: b.rng.fork(),
    })
}
