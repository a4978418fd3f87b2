//! The `tls:` sections: a listener's certificate and client-certificate policy, a cluster's
//! origination settings, and the identity patterns routes authorize against.
//!
//! Validation loads every file named here and builds the rustls config from it, so a missing file,
//! a key that does not match its certificate or an empty CA bundle is reported at
//! `FILE:LINE:COLUMN` by `outrigger check` and by a reload, which then keeps the running config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::Validator;
use crate::proxy::tls;

/// A listener's `tls:` section, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    /// PEM file with the certificate chain, leaf first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// PEM bundle of CAs whose client certificates are accepted; setting it requires one (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    /// Client identities (SAN URI or DNS name) allowed to connect; a trailing `*` matches a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_identities: Vec<String>,
}

/// A cluster's `tls:` section, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientTls {
    /// PEM bundle of CAs trusted for the upstream's certificate; the system's roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Name sent as SNI and checked against the certificate; defaults to the endpoint's host
    /// (the DNS name for `dns:` clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM client certificate chain presented to the upstream (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One allowed identity: an exact SAN URI or DNS name, or a prefix of one (written `prefix*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// The identity equals this.
    Exact(String),
    /// The identity starts with this.
    Prefix(String),
}

impl IdentityPattern {
    /// Parses `spiffe://mesh/ns/prod/*` as a prefix and anything else as an exact identity.
    pub fn parse(text: &str) -> Self {
        match text.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(text.to_owned()),
        }
    }

    /// Whether `identity` is allowed by this pattern.
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            Self::Exact(e) => e == identity,
            Self::Prefix(p) => identity.starts_with(p.as_str()),
        }
    }
}

/// Whether any of `identities` (a peer's SAN URIs and DNS names) is allowed by `patterns`.
pub fn allowed(patterns: &[IdentityPattern], identities: &[String]) -> bool {
    identities
        .iter()
        .any(|id| patterns.iter().any(|p| p.matches(id)))
}

/// A validated listener `tls:` section; the files were readable and consistent when checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsConfig {
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
    /// Client CA bundle; `Some` means client certificates are required.
    pub client_ca: Option<PathBuf>,
    /// Allowed client identities; empty allows any certificate the CA signed.
    pub allowed_identities: Vec<IdentityPattern>,
}

/// A validated cluster `tls:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientTlsConfig {
    /// CA bundle; `None` uses the system's roots.
    pub ca: Option<PathBuf>,
    /// SNI and verified name; `None` uses the endpoint's host.
    pub server_name: Option<String>,
    /// Client certificate chain and key, for mTLS to the upstream.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Validator {
    pub(super) fn server_tls(&mut self, path: &str, t: &RawServerTls) -> Option<ServerTlsConfig> {
        if !t.allowed_identities.is_empty() && t.client_ca.is_none() {
            self.problem_with_hint(
                format!("{path}.allowed_identities"),
                "`allowed_identities` needs client certificates".into(),
                Some("add `client_ca:` with the CA that signs your clients' certificates".into()),
            );
            return None;
        }
        let config = ServerTlsConfig {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
            client_ca: t.client_ca.as_ref().map(PathBuf::from),
            allowed_identities: self
                .identities(&format!("{path}.allowed_identities"), &t.allowed_identities),
        };
        if let Err(e) = tls::ServerMaterial::load(&config) {
            self.problem(format!("{path}.{}", e.field), e.to_string());
            return None;
        }
        Some(config)
    }

    pub(super) fn client_tls(&mut self, path: &str, t: &RawClientTls) -> Option<ClientTlsConfig> {
        let identity = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                self.problem(
                    path.to_owned(),
                    "give both `cert` and `key` for a client certificate, or neither".into(),
                );
                return None;
            }
        };
        if let Some(name) = &t.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.problem(
                    format!("{path}.server_name"),
                    format!("`{name}` is not a valid DNS name or IP address"),
                );
                return None;
            }
        }
        let config = ClientTlsConfig {
            ca: t.ca.as_ref().map(PathBuf::from),
            server_name: t.server_name.clone(),
            identity,
        };
        if let Err(e) = tls::client_config(&config, false) {
            self.problem(format!("{path}.{}", e.field), e.to_string());
            return None;
        }
        Some(config)
    }

    pub(super) fn identities(&mut self, path: &str, list: &[String]) -> Vec<IdentityPattern> {
        for (i, id) in list.iter().enumerate() {
            if id.is_empty() || id == "*" {
                self.problem_with_hint(
                    format!("{path}[{i}]"),
                    format!("identity pattern `{id}` would allow everyone"),
                    Some("write an identity, e.g. `spiffe://mesh/ns/prod/sa/web`".into()),
                );
            }
        }
        list.iter().map(|s| IdentityPattern::parse(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let p = [
            IdentityPattern::parse("spiffe://mesh/ns/prod/*"),
            IdentityPattern::parse("web.internal"),
        ];
        let ok = |ids: &[&str]| allowed(&p, &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["spiffe://mesh/ns/prod/sa/web"]));
        assert!(ok(&["other", "web.internal"]));
        assert!(!ok(&["spiffe://mesh/ns/dev/sa/web"]));
        assert!(!ok(&["web.internal.evil"]));
        assert!(!ok(&[]));
    }
}
