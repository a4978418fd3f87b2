//! The `tls:` sections: a listener's certificate and client-certificate policy, a cluster's
//! origination settings, and the identity patterns routes authorize against.
//!
//! Validation loads every file named here and builds the rustls config from it, so a missing file,
//! a key that does not match its certificate or an empty CA bundle is reported at
//! `FILE:LINE:COLUMN` by `outrigger check` and by a reload, which then keeps the running config.

use serde::{Deserialize, Serialize};

use super::validate::Validator;
use crate::tls;
pub use crate::tls::{allowed, ClientTlsConfig, IdentityPattern, ServerTlsConfig};

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
            cert: self.path(&t.cert),
            key: self.path(&t.key),
            client_ca: t.client_ca.as_deref().map(|p| self.path(p)),
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
            (Some(c), Some(k)) => Some((self.path(c), self.path(k))),
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
            ca: t.ca.as_deref().map(|p| self.path(p)),
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
