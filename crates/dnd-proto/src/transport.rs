//! How dnd's servers listen and its clients connect: one place for TLS, auth and limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

use crate::auth::{AttachToken, BearerToken};

/// Largest message either side decodes. Job files and task descriptions are small; the
/// limit stops a confused or hostile peer from making a server buffer gigabytes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} {path}: {reason}")]
    Read { what: &'static str, path: String, reason: String },
    #[error(
        "invalid coordinator address `{url}`: {reason}; write it as http://host:port or https://host:port"
    )]
    BadUrl { url: String, reason: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot connect to the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    HalfTls,
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// rustls needs one process-wide crypto provider, and dnd's dependency tree offers two
/// (aws-lc-rs and ring): pick aws-lc-rs, once, before any TLS config is built.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Read {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A server's TLS identity, when it serves TLS.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl ServerConfig {
    /// A tonic server builder with TLS (when configured) and keepalives set.
    pub fn builder(&self) -> Result<Server, TransportError> {
        let mut server = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .concurrency_limit_per_connection(256);
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                install_crypto_provider();
                let identity = Identity::from_pem(
                    read_pem("the TLS certificate", cert)?,
                    read_pem("the TLS key", key)?,
                );
                server = server
                    .tls_config(ServerTlsConfig::new().identity(identity))
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
            }
            (None, None) => {}
            _ => return Err(TransportError::HalfTls),
        }
        Ok(server)
    }
}

/// Where a client connects and how it proves who it is.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub token: BearerToken,
    /// A CA certificate (PEM) to trust for `https://`, beside the system's roots.
    pub tls_ca: Option<PathBuf>,
}

/// A channel whose every call carries the token.
pub type AuthedChannel = InterceptedService<Channel, AttachToken>;

impl ClientConfig {
    fn endpoint(&self) -> Result<Endpoint, TransportError> {
        let bad = |reason: String| TransportError::BadUrl { url: self.url.clone(), reason };
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(bad("it has no http:// or https:// scheme".into()));
        }
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if self.url.starts_with("https://") {
            install_crypto_provider();
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &self.tls_ca {
                tls = tls
                    .ca_certificate(Certificate::from_pem(read_pem("the TLS CA certificate", ca)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
        }
        Ok(endpoint)
    }

    /// Connects now, failing with the reason when the coordinator is not there.
    pub async fn connect(&self) -> Result<AuthedChannel, TransportError> {
        let channel = self.endpoint()?.connect().await.map_err(|e| TransportError::Connect {
            url: self.url.clone(),
            reason: error_chain(&e),
        })?;
        Ok(InterceptedService::new(channel, AttachToken(self.token.clone())))
    }

    /// A channel that connects on first use and reconnects after the coordinator restarts.
    pub fn connect_lazy(&self) -> Result<AuthedChannel, TransportError> {
        Ok(InterceptedService::new(
            self.endpoint()?.connect_lazy(),
            AttachToken(self.token.clone()),
        ))
    }
}

/// An error and its causes on one line (tonic's transport errors hide the useful part in
/// their sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
