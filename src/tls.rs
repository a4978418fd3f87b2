//! TLS with rustls: termination on listeners (optionally requiring client certificates and
//! authorizing their identity), origination to upstream clusters, and certificate rotation.
//!
//! A neutral module: the data path terminates and originates TLS with it, config validation loads
//! the files with it (so a bad file is an error at its `FILE:LINE:COLUMN`), and the health checks
//! and the future mesh transport connect with it. It depends on no module of either side.
//!
//! The same pieces serve any connection the sidecar makes or takes, the cluster's own peer
//! traffic included: [`ServerMaterial`] builds a server config from files, [`client_config`] a
//! client one, and [`Rotating`] keeps either fresh as its files change. A changed file is read
//! whole and checked before it replaces anything: new connections get the new material, existing
//! ones keep theirs, and a broken file is logged and counted while the old material stays.
//!
//! A peer's identity is the list of URI and DNS names in its certificate's subject alternative
//! names (a SPIFFE ID is a URI SAN). It is read once per connection, after the handshake.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::BoxError;
use crate::tasks::{Scope, Tasks};
use crate::telemetry::metrics::{CertMetrics, Handshake};
use crate::watch;

/// ALPN protocols a listener offers, preferred first.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

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

/// The crypto provider every config is built with; passed explicitly, never installed globally.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS file that could not be used, and the config field that named it.
#[derive(Debug)]
pub struct LoadError {
    /// The field under `tls:` (`cert`, `key`, `client_ca`, `ca`).
    pub field: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot use `{}`: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for LoadError {}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| LoadError {
        field,
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let fail = |message: String| LoadError {
        field,
        path: path.to_owned(),
        message,
    };
    let list = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not a PEM certificate file: {e}")))?;
    if list.is_empty() {
        return Err(fail(
            "no certificate (`-----BEGIN CERTIFICATE-----`) in it".into(),
        ));
    }
    Ok(list)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, LoadError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| LoadError {
        field: "key",
        path: path.to_owned(),
        message: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })
}

fn roots(field: &'static str, path: &Path, pem: &[u8]) -> Result<RootCertStore, LoadError> {
    let mut store = RootCertStore::empty();
    for cert in certs(field, path, pem)? {
        store.add(cert).map_err(|e| LoadError {
            field,
            path: path.to_owned(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// The URI and DNS names of a certificate's subject alternative names: its identities.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// When a certificate expires, in seconds since the Unix epoch.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// A listener's TLS material, built and checked.
pub struct ServerMaterial {
    /// The rustls config new handshakes use.
    pub config: Arc<ServerConfig>,
    /// The serving certificate's expiry (Unix seconds).
    pub not_after: Option<i64>,
    files: Vec<Vec<u8>>,
}

impl ServerMaterial {
    /// Reads the files of `cfg` and builds the server config.
    pub fn load(cfg: &ServerTlsConfig) -> Result<Self, LoadError> {
        let mut files = vec![read("cert", &cfg.cert)?, read("key", &cfg.key)?];
        if let Some(ca) = &cfg.client_ca {
            files.push(read("client_ca", ca)?);
        }
        Self::build(cfg, files)
    }

    fn build(cfg: &ServerTlsConfig, files: Vec<Vec<u8>>) -> Result<Self, LoadError> {
        let chain = certs("cert", &cfg.cert, &files[0])?;
        let key = key(&cfg.key, &files[1])?;
        let not_after = not_after(&chain[0]);
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| LoadError {
                field: "cert",
                path: cfg.cert.clone(),
                message: e.to_string(),
            })?;
        let builder = match (&cfg.client_ca, files.get(2)) {
            (Some(ca_path), Some(ca)) => {
                let store = roots("client_ca", ca_path, ca)?;
                let inner =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                        .build()
                        .map_err(|e| LoadError {
                            field: "client_ca",
                            path: ca_path.clone(),
                            message: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(Arc::new(IdentityVerifier {
                    inner,
                    allowed: cfg.allowed_identities.clone(),
                }))
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| LoadError {
                field: "key",
                path: cfg.key.clone(),
                message: format!("does not fit the certificate: {e}"),
            })?;
        config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            not_after,
            files,
        })
    }
}

/// Verifies a client certificate against the CA, then its identity against the allow-list, so a
/// refused identity fails the handshake with a TLS alert rather than a dropped connection.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<IdentityPattern>,
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() || allowed(&self.allowed, &identities(end_entity)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a handshake failed, as counted in `outrigger_tls_handshakes_total`.
pub fn handshake_failure(e: &io::Error) -> Handshake {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Handshake::Failed;
    };
    match tls {
        rustls::Error::NoCertificatesPresented => Handshake::NoClientCert,
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            Handshake::IdentityDenied
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Handshake::ExpiredCert,
        rustls::Error::InvalidCertificate(_) => Handshake::UntrustedCert,
        _ => Handshake::Failed,
    }
}

/// Builds the client config of a cluster: its CA (or the system's roots), its client
/// certificate if any, and ALPN for the cluster's protocol.
pub fn client_config(cfg: &ClientTlsConfig, h2: bool) -> Result<Arc<ClientConfig>, LoadError> {
    client_material(cfg, h2).map(|(c, _)| c)
}

fn client_files(cfg: &ClientTlsConfig) -> Result<Vec<Vec<u8>>, LoadError> {
    let mut files = Vec::new();
    if let Some(ca) = &cfg.ca {
        files.push(read("ca", ca)?);
    }
    if let Some((cert, key)) = &cfg.identity {
        files.push(read("cert", cert)?);
        files.push(read("key", key)?);
    }
    Ok(files)
}

fn client_material(
    cfg: &ClientTlsConfig,
    h2: bool,
) -> Result<(Arc<ClientConfig>, Vec<Vec<u8>>), LoadError> {
    let files = client_files(cfg)?;
    let config = build_client(cfg, &files, h2)?;
    Ok((config, files))
}

fn build_client(
    cfg: &ClientTlsConfig,
    files: &[Vec<u8>],
    h2: bool,
) -> Result<Arc<ClientConfig>, LoadError> {
    let mut next = files.iter();
    let store = match &cfg.ca {
        Some(path) => roots("ca", path, next.next().map_or(&[][..], |f| f))?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| LoadError {
            field: "ca",
            path: PathBuf::new(),
            message: e.to_string(),
        })?
        .with_root_certificates(store);
    let mut config = match &cfg.identity {
        Some((cert_path, key_path)) => {
            let chain = certs("cert", cert_path, next.next().map_or(&[][..], |f| f))?;
            let key = key(key_path, next.next().map_or(&[][..], |f| f))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| LoadError {
                    field: "key",
                    path: key_path.clone(),
                    message: format!("does not fit the certificate: {e}"),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(config))
}

fn system_roots() -> Result<RootCertStore, LoadError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(LoadError {
            field: "ca",
            path: PathBuf::from("<system roots>"),
            message: "no system CA certificates found".into(),
        });
    }
    Ok(store)
}

/// TLS material that is re-read when its files change, for as long as this value lives.
pub struct Rotating<T> {
    current: Arc<ArcSwap<T>>,
    _watch: Scope,
}

impl<T: Send + Sync + 'static> Rotating<T> {
    /// The material new connections should use.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Watches `paths` on a task of `tasks` and rebuilds with `rebuild` after each change;
    /// `rebuild` gets the files' bytes and returns `None` when they are unchanged.
    fn start<F>(
        initial: T,
        owner: &str,
        paths: Vec<PathBuf>,
        metrics: CertMetrics,
        tasks: &Tasks,
        mut rebuild: F,
    ) -> Self
    where
        F: FnMut() -> Result<Option<T>, LoadError> + Send + 'static,
    {
        let current = Arc::new(ArcSwap::from_pointee(initial));
        let scope = tasks.child();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        match watch::watch_all(&refs) {
            Ok(changes) => {
                let (target, owner) = (current.clone(), owner.to_owned());
                scope.tasks().spawn("tls_watch", async move {
                    watch::on_change(changes, || {
                        match rebuild() {
                            Ok(Some(next)) => {
                                target.store(Arc::new(next));
                                metrics.applied.inc();
                                tracing::info!(%owner, "TLS certificate files reloaded");
                            }
                            Ok(None) => {}
                            Err(e) => {
                                metrics.failed.inc();
                                tracing::error!(%owner, error = %e, "TLS files rejected; keeping the previous ones");
                            }
                        }
                        std::future::ready(())
                    })
                    .await;
                });
            }
            Err(e) => {
                tracing::warn!(%owner, error = %e, "cannot watch TLS files; rotation needs a reload")
            }
        }
        Self {
            current,
            _watch: scope,
        }
    }
}

/// A listener's server config, rotated as its files change.
pub type ServerTls = Rotating<ServerMaterial>;

/// Starts serving `material` for the listener `owner` and watching its files on `tasks`.
pub fn rotating_server(
    cfg: ServerTlsConfig,
    material: ServerMaterial,
    owner: &str,
    metrics: CertMetrics,
    tasks: &Tasks,
) -> ServerTls {
    let mut paths = vec![cfg.cert.clone(), cfg.key.clone()];
    paths.extend(cfg.client_ca.clone());
    let mut last = material.files.clone();
    let expiry = metrics.expiry.clone();
    let publish = move |t: Option<i64>| {
        if let (Some(g), Some(t)) = (&expiry, t) {
            g.set(t);
        }
    };
    publish(material.not_after);
    Rotating::start(material, owner, paths, metrics, tasks, move || {
        let mut files = vec![read("cert", &cfg.cert)?, read("key", &cfg.key)?];
        if let Some(ca) = &cfg.client_ca {
            files.push(read("client_ca", ca)?);
        }
        if files == last {
            return Ok(None);
        }
        let next = ServerMaterial::build(&cfg, files)?;
        last = next.files.clone();
        publish(next.not_after);
        Ok(Some(next))
    })
}

/// How a cluster's connections are secured.
pub struct ClientTls {
    config: Rotating<ClientConfig>,
    /// Fixed SNI, if the config gave one (or the cluster's DNS name).
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Builds the client side for a cluster named `owner`, watching its files.
    pub fn new(
        cfg: &ClientTlsConfig,
        default_name: Option<&str>,
        h2: bool,
        owner: &str,
        metrics: CertMetrics,
        tasks: &Tasks,
    ) -> Result<Self, LoadError> {
        let (config, files) = client_material(cfg, h2)?;
        let server_name = cfg
            .server_name
            .as_deref()
            .or(default_name)
            .and_then(|n| ServerName::try_from(n.to_owned()).ok());
        let mut paths: Vec<PathBuf> = cfg.ca.iter().cloned().collect();
        if let Some((c, k)) = &cfg.identity {
            paths.extend([c.clone(), k.clone()]);
        }
        let (cfg, mut last) = (cfg.clone(), files);
        let config = Rotating::start(
            Arc::unwrap_or_clone(config),
            owner,
            paths,
            metrics,
            tasks,
            move || {
                let files = client_files(&cfg)?;
                if files == last {
                    return Ok(None);
                }
                let next = build_client(&cfg, &files, h2)?;
                last = files;
                Ok(Some(Arc::unwrap_or_clone(next)))
            },
        );
        Ok(Self {
            config,
            server_name,
        })
    }

    /// Runs the client handshake on `tcp` to `host` (the SNI and the name checked, unless the
    /// config fixed one) with the current material.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        tokio_rustls::TlsConnector::from(self.config.current())
            .connect(name, tcp)
            .await
    }
}

/// Connects to upstream endpoints: TCP, then TLS when the cluster has it.
#[derive(Clone)]
pub struct UpstreamConnector {
    http: HttpConnector,
    tls: Option<Arc<ClientTls>>,
}

impl UpstreamConnector {
    /// A connector over `http` that adds TLS when `tls` is given.
    pub fn new(mut http: HttpConnector, tls: Option<Arc<ClientTls>>) -> Self {
        http.enforce_http(false);
        Self { http, tls }
    }
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let host = uri.host().unwrap_or_default().to_owned();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(TokioIo::new(UpstreamStream::Plain(tcp)));
            };
            let stream = tls.connect(tcp, &host).await?;
            Ok(TokioIo::new(UpstreamStream::Tls(Box::new(stream))))
        })
    }
}

/// An upstream connection, plain or TLS.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Cleartext TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(s) => s.connected(),
            Self::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
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
