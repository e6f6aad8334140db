//! `CommandError`: how a command (from a client or the HTTP API) fails — its documented
//! code, a message for humans, and whether the connection must close afterwards. Every
//! broker failure converts into one through `From`, so handlers just use `?`.

use crate::{
    blobs::{TypeError, upload::UploadError},
    broker::BrokerError,
};
use broker_proto::{CloseCode, ErrorCode};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (code {})", code.code())]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
    /// Close the connection with this code after replying.
    pub close: Option<CloseCode>,
    /// Whether a retry may succeed, where the code alone does not say (114).
    temporary: Option<bool>,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            close: None,
            temporary: None,
        }
    }

    /// An RPC backend failure (114), temporary or not.
    pub fn backend(message: impl Into<String>, temporary: bool) -> Self {
        Self {
            temporary: Some(temporary),
            ..Self::new(ErrorCode::BackendError, message)
        }
    }

    /// Whether retrying the same command later may succeed.
    pub fn temporary(&self) -> bool {
        self.temporary.unwrap_or_else(|| self.code.temporary())
    }

    /// An error after which the connection closes with `close`.
    pub fn closing(code: ErrorCode, message: impl Into<String>, close: CloseCode) -> Self {
        Self {
            close: Some(close),
            ..Self::new(code, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    /// 104 when a client-supplied string is longer than `max` bytes: every string a client
    /// sends has its own bound, apart from the payload's.
    pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), Self> {
        if value.len() > max {
            return Err(Self::bad_request(format!("{field} is at most {max} bytes")));
        }
        Ok(())
    }
}

/// Bounds on client-supplied strings (error 104 beyond them).
pub mod bounds {
    /// A publication's or upload's `contentType`, an RPC's `contentType`.
    pub const CONTENT_TYPE: usize = 255;
    /// A publish's `idempotencyKey`.
    pub const IDEMPOTENCY_KEY: usize = 128;
    /// `Connect.name` and `Connect.version`.
    pub const CLIENT_LABEL: usize = 64;
}

impl From<BrokerError> for CommandError {
    fn from(e: BrokerError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<UploadError> for CommandError {
    fn from(e: UploadError) -> Self {
        let code = match e {
            UploadError::Bad(_) => ErrorCode::BadUpload,
            UploadError::TooLarge(_) => ErrorCode::MessageTooLarge,
            UploadError::Limit(_) => ErrorCode::LimitExceeded,
        };
        CommandError::new(code, e.to_string())
    }
}

impl From<TypeError> for CommandError {
    fn from(e: TypeError) -> Self {
        CommandError::new(ErrorCode::BlobTypeNotAllowed, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_keep_their_code_and_temporariness() {
        let e = CommandError::from(BrokerError::Unavailable("down".into()));
        assert_eq!((e.code, e.close), (ErrorCode::BrokerUnavailable, None));
        assert!(e.code.temporary() && e.message.contains("down"));
        let e = CommandError::from(BrokerError::Internal("bad reply".into()));
        assert_eq!(e.code, ErrorCode::Internal);
    }
}
