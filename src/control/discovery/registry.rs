//! `registry` clusters: a service in the embedded Raft group's registry as a discovery source.
//!
//! A voter or learner reads the registry it holds, published after every applied batch, and
//! answers at once; a `role: client` sidecar asks the members with blocking reads that return
//! when the service changes past the index it has seen (Consul's blocking query), moving to
//! another member when one fails. Either way a failure never empties the cluster: the last set
//! stays while the group is unreachable, which is what lets a sidecar keep routing through a
//! total loss of the group.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Method, StatusCode};
use tokio::sync::watch;

use super::{Discovery, Target, Update};
use crate::control::mesh::client::MeshClient;
use crate::control::mesh::registry::{Instance, Service};
use crate::control::mesh::server::ReadAnswer;
use crate::control::mesh::store::State;

/// How long a blocking read asks the member to hold it.
const WAIT: Duration = Duration::from_secs(30);
/// Pause before asking again after a failed read.
const RETRY: Duration = Duration::from_secs(1);

/// Where this sidecar reads the registry from.
#[derive(Clone, Debug)]
pub enum Registry {
    /// A member's own applied state.
    Local(watch::Receiver<Arc<State>>),
    /// The members' registry API.
    Remote(Box<MeshClient>),
}

impl Registry {
    /// A discovery source following `service`.
    pub fn watch(&self, service: &str) -> Watch {
        Watch {
            service: service.to_owned(),
            seen: None,
            source: self.clone(),
        }
    }
}

/// Follows one service.
pub struct Watch {
    service: String,
    /// The change index of the last answer given.
    seen: Option<u64>,
    source: Registry,
}

fn modified(state: &State, service: &str) -> u64 {
    state.registry.service(service).map_or(0, |s| s.modified)
}

/// The endpoint set of a service's instances (IPv6 addresses bracketed), sorted.
fn targets<'a>(instances: impl Iterator<Item = &'a Instance>) -> Update {
    let mut list: Vec<Target> = instances
        .filter_map(|i| {
            let authority: Authority = i.registration.host_port().parse().ok()?;
            Some((authority, i.registration.weight.max(1)))
        })
        .collect();
    if list.is_empty() {
        return Update::Empty;
    }
    list.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Update::Endpoints(list)
}

impl Watch {
    fn local_answer(&mut self, state: &State) -> Update {
        self.seen = Some(modified(state, &self.service));
        let service: Option<&Service> = state.registry.service(&self.service).map(|s| s.as_ref());
        targets(service.into_iter().flat_map(|s| s.instances.values()))
    }

    async fn remote(&mut self, client: &MeshClient) -> Update {
        let path = match self.seen {
            Some(index) => format!(
                "/v1/registry/{}?index={index}&wait={}s",
                self.service,
                WAIT.as_secs()
            ),
            None => format!("/v1/registry/{}", self.service),
        };
        let answer = client
            .call(
                Method::GET,
                &path,
                Bytes::new(),
                WAIT + Duration::from_secs(5),
            )
            .await;
        let read: ReadAnswer = match answer {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return Update::Failed(format!("registry answer: {e}")),
            },
            Ok((status, body)) => {
                return Update::Failed(format!(
                    "registry answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ))
            }
            Err(e) => return Update::Failed(e.to_string()),
        };
        let service = read.services.get(&self.service);
        self.seen = Some(service.map_or(0, |s| s.modified));
        targets(service.into_iter().flat_map(|s| s.instances.iter()))
    }
}

impl Discovery for Watch {
    fn kind(&self) -> &'static str {
        "registry"
    }

    fn ready(&mut self) -> Option<Update> {
        match &self.source {
            Registry::Local(rx) => {
                let state = rx.borrow().clone();
                Some(self.local_answer(&state))
            }
            Registry::Remote(_) => None,
        }
    }

    async fn next(&mut self) -> Option<Update> {
        match self.source.clone() {
            Registry::Local(mut rx) => {
                let seen = self.seen;
                let service = self.service.clone();
                let state = rx
                    .wait_for(|s| Some(modified(s, &service)) != seen)
                    .await
                    .ok()?
                    .clone();
                Some(self.local_answer(&state))
            }
            Registry::Remote(client) => loop {
                let client = &*client;
                let before = self.seen;
                let update = self.remote(client).await;
                match &update {
                    Update::Failed(_) => {
                        tokio::time::sleep(RETRY).await;
                        return Some(update);
                    }
                    // A blocking read that timed out without a change: ask again.
                    _ if before.is_some() && before == self.seen => continue,
                    _ => return Some(update),
                }
            },
        }
    }
}
