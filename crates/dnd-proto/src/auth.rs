//! Bearer-token auth: every call but the health service carries
//! `authorization: Bearer <token>`, compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable holding the token when no file is given.
pub const TOKEN_ENV: &str = "DND_TOKEN";

/// Shortest token accepted: anything shorter is guessable.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "no auth token: pass --token-file <file> or set {TOKEN_ENV} (the same token on the coordinator, the workers and the clients)"
    )]
    Missing,
    #[error(
        "the auth token from {origin} is too short ({len} characters): use at least {MIN_TOKEN_LEN}, e.g. `openssl rand -hex 32`"
    )]
    TooShort { origin: String, len: usize },
    #[error(
        "the auth token from {origin} contains characters that cannot go in an HTTP header: use printable ASCII"
    )]
    NotAscii { origin: String },
}

/// A shared secret. `Debug` never shows it.
#[derive(Clone)]
pub struct BearerToken {
    secret: String,
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(secret: &str, origin: &str) -> Result<Self, TokenError> {
        let secret = secret.trim();
        if secret.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort { origin: origin.into(), len: secret.len() });
        }
        let header = format!("Bearer {secret}")
            .parse()
            .map_err(|_| TokenError::NotAscii { origin: origin.into() })?;
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotAscii { origin: origin.into() });
        }
        Ok(Self { secret: secret.to_string(), header })
    }

    /// The token from `file` when given, else from `DND_TOKEN`.
    pub fn load(file: Option<&Path>) -> Result<Self, TokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| TokenError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            return Self::new(&text, &path.display().to_string());
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::new(&v, TOKEN_ENV),
            _ => Err(TokenError::Missing),
        }
    }

    /// A fresh random token, for a coordinator and workers inside one process.
    pub fn random() -> Self {
        let mut bytes = [0u8; 24];
        // std's RandomState is seeded from the OS; two of them give 128 unpredictable bits.
        for chunk in bytes.chunks_mut(8) {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0);
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(&hex, "random").expect("48 hex digits are a valid token")
    }

    fn matches(&self, header: &[u8]) -> bool {
        let Some(presented) = header.strip_prefix(b"Bearer ") else { return false };
        presented.ct_eq(self.secret.as_bytes()).into()
    }
}

/// Server side: rejects a call without the right token with UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct RequireToken(pub BearerToken);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            Some(value) if self.0.matches(value.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong auth token: use the coordinator's token (--token-file or DND_TOKEN)",
            )),
            None => Err(Status::unauthenticated(
                "missing auth token: pass --token-file or set DND_TOKEN",
            )),
        }
    }
}

/// Client side: adds the token to every call.
#[derive(Clone, Debug)]
pub struct AttachToken(pub BearerToken);

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(header: Option<&str>) -> Result<Request<()>, Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        RequireToken(BearerToken::new("0123456789abcdef0123", "test").unwrap()).call(request)
    }

    #[test]
    fn only_the_right_token_passes() {
        assert!(call_with(Some("Bearer 0123456789abcdef0123")).is_ok());
        for bad in [
            None,
            Some("Bearer 0123456789abcdef0124"),
            Some("Bearer 0123456789abcdef012"),
            Some("0123456789abcdef0123"),
            Some("Basic x"),
        ] {
            let status = call_with(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn the_client_side_attaches_what_the_server_side_accepts() {
        let token = BearerToken::random();
        let request = AttachToken(token.clone()).call(Request::new(())).unwrap();
        assert!(RequireToken(token).call(request).is_ok());
    }

    #[test]
    fn short_or_missing_tokens_are_refused_with_advice() {
        assert!(matches!(BearerToken::new("short", "x"), Err(TokenError::TooShort { .. })));
        assert!(
            BearerToken::new("  0123456789abcdef0123\n", "file").is_ok(),
            "a trailing newline from a file is fine"
        );
        let dir = std::env::temp_dir().join("dnd-no-such-token-file");
        let err = BearerToken::load(Some(&dir)).unwrap_err().to_string();
        assert!(err.contains("dnd-no-such-token-file"), "{err}");
    }
}
