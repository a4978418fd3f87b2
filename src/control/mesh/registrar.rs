//! Self-registration: the sidecar keeps its application in the registry while the application
//! passes its health check, and takes it out when the check fails or the sidecar drains.
//!
//! The lease is renewed every third of its TTL, so two renewals can be lost before it lapses; a
//! renewal the leader does not know (the lease expired, or was registered under an older leader
//! whose table it never reached) registers again at once. A failed call is retried on the next
//! beat: while the group is unreachable the instance stays registered until its TTL runs out,
//! which is the point of a TTL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Method, StatusCode};
use tokio::sync::{mpsc, watch};

use super::client::MeshClient;
use super::registry::{Lease, Registration};
use super::server::{InstanceRef, Renew, Renewed};
use crate::control::config::mesh::RegisterConfig;
use crate::control::discovery::Endpoints;
use crate::control::health::{self, Health, Verdict};
use crate::rng::Rng;
use crate::tasks::Tasks;
use crate::telemetry::metrics::HealthMetrics;

/// How long one registry call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The running registrar; [`Registrar::deregister`] takes the instance out (on drain).
#[derive(Debug)]
pub struct Registrar {
    stop: watch::Sender<bool>,
    ended: watch::Receiver<bool>,
}

impl Registrar {
    /// Starts keeping `cfg`'s registration in the registry through `client`.
    pub fn start(
        cfg: RegisterConfig,
        client: MeshClient,
        metrics: HealthMetrics,
        rng: Rng,
        tasks: &Tasks,
    ) -> Registrar {
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(false);
        let (verdict_tx, verdicts) = mpsc::channel(16);
        let gated = cfg.health_check.is_some();
        if let Some(check) = cfg.health_check.clone() {
            let r = &cfg.registration;
            if let Ok(authority) = cfg.check_target.parse::<Authority>() {
                // Kept open by the registrar's task: the checker stops when the channel goes.
                let (endpoints_tx, endpoints) = watch::channel(Endpoints {
                    source: "static",
                    list: Arc::from(vec![(authority, 1)]),
                });
                let target = health::Target {
                    cluster: Arc::from(format!("register:{}", r.service)),
                    endpoints,
                    owner: None,
                    verdicts: verdict_tx,
                    tls: None,
                    metrics,
                    rng,
                };
                health::start(check, target, tasks);
                tasks.spawn("mesh_registrar", async move {
                    run(cfg.registration, client, gated, verdicts, stop_rx).await;
                    drop(endpoints_tx);
                    let _ = ended_tx.send(true);
                });
                return Registrar { stop, ended };
            }
        }
        tasks.spawn("mesh_registrar", async move {
            run(cfg.registration, client, gated, verdicts, stop_rx).await;
            let _ = ended_tx.send(true);
        });
        Registrar { stop, ended }
    }

    /// Takes the instance out of the registry and stops renewing; waits up to `within`.
    pub async fn deregister(&self, within: Duration) {
        let _ = self.stop.send(true);
        let mut ended = self.ended.clone();
        let _ = tokio::time::timeout(within, ended.wait_for(|e| *e)).await;
    }
}

async fn run(
    registration: Registration,
    client: MeshClient,
    gated: bool,
    mut verdicts: mpsc::Receiver<Verdict>,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_millis(registration.ttl_ms / 3).max(Duration::from_millis(100));
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = !gated;
    let mut lease: Option<Lease> = None;
    loop {
        tokio::select! {
            // Mapped to a bool so the channel's read guard ends inside the branch's future.
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                if let Some(l) = lease.take() {
                    deregister(&client, &l).await;
                }
                return;
            }
            v = verdicts.recv(), if gated => match v {
                Some(v) => healthy = v.health == Health::Healthy,
                None => healthy = false,
            },
            _ = beat.tick() => {}
        }
        match (healthy, &lease) {
            (true, None) => lease = register(&client, &registration).await,
            (true, Some(l)) => {
                if !renew(&client, l).await {
                    lease = register(&client, &registration).await;
                }
            }
            (false, Some(l)) => {
                tracing::info!(service = %l.service, id = %l.id,
                    "local application failed its health check: deregistering");
                deregister(&client, l).await;
                lease = None;
            }
            (false, None) => {}
        }
    }
}

async fn register(client: &MeshClient, r: &Registration) -> Option<Lease> {
    let body = serde_json::to_vec(r).ok()?;
    match client
        .call(
            Method::POST,
            "/v1/registry/register",
            Bytes::from(body),
            CALL_TIMEOUT,
        )
        .await
    {
        Ok((StatusCode::OK, text)) => {
            let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
            let revision = v["revision"].as_u64()?;
            tracing::info!(service = %r.service, id = %r.id, revision, "registered in the mesh registry");
            Some(Lease {
                service: r.service.clone(),
                id: r.id.clone(),
                revision,
            })
        }
        Ok((status, text)) => {
            tracing::warn!(service = %r.service, %status, answer = %String::from_utf8_lossy(&text).trim(),
                "registration refused");
            None
        }
        Err(e) => {
            tracing::debug!(service = %r.service, error = %e, "registration failed; will retry");
            None
        }
    }
}

/// Renews `lease`; false if the leader does not know it (register again).
async fn renew(client: &MeshClient, lease: &Lease) -> bool {
    let Ok(body) = serde_json::to_vec(&Renew {
        leases: vec![lease.clone()],
    }) else {
        return true;
    };
    match client
        .call(
            Method::POST,
            "/v1/registry/renew",
            Bytes::from(body),
            CALL_TIMEOUT,
        )
        .await
    {
        Ok((StatusCode::OK, text)) => match serde_json::from_slice::<Renewed>(&text) {
            Ok(r) => r.results.first().map(String::as_str) != Some("unknown"),
            Err(_) => true,
        },
        // Not known to fail: keep the lease and try again on the next beat.
        _ => true,
    }
}

async fn deregister(client: &MeshClient, lease: &Lease) {
    let Ok(body) = serde_json::to_vec(&InstanceRef {
        service: lease.service.clone(),
        id: lease.id.clone(),
    }) else {
        return;
    };
    match client
        .call(
            Method::POST,
            "/v1/registry/deregister",
            Bytes::from(body),
            CALL_TIMEOUT,
        )
        .await
    {
        Ok((StatusCode::OK, _)) => {
            tracing::info!(service = %lease.service, id = %lease.id, "deregistered from the mesh registry")
        }
        other => {
            tracing::warn!(service = %lease.service, id = %lease.id, answer = ?other.map(|(s, _)| s),
            "deregistration failed; the lease will expire")
        }
    }
}
