//! Error codes (carried in `Error.code`) and WebSocket close codes, as tabled in DESIGN.md.
//! Both are part of the contract: add codes, never renumber.

/// A command failed; sent in `ServerFrame.error` and in HTTP API error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Internal = 100,
    Unauthorized = 101,
    UnknownChannel = 102,
    PermissionDenied = 103,
    BadRequest = 104,
    AlreadySubscribed = 105,
    LimitExceeded = 106,
    TooManyRequests = 107,
    BrokerUnavailable = 108,
    TokenExpired = 109,
    MessageTooLarge = 110,
    /// A blob id that is unknown or expired.
    BlobNotFound = 111,
    /// A blob whose sniffed type is not allowed, or not the claimed one.
    BlobTypeNotAllowed = 112,
    /// A bad upload: chunk out of order, size or hash mismatch, unknown upload.
    BadUpload = 113,
    /// The RPC backend failed; temporary when it timed out, was unreachable or answered 5xx.
    BackendError = 114,
}

impl ErrorCode {
    /// Whether retrying the same command later may succeed (for 114 it varies: the error
    /// says).
    pub fn temporary(self) -> bool {
        matches!(
            self,
            Self::Internal | Self::TooManyRequests | Self::BrokerUnavailable
        )
    }

    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why the server closed a WebSocket. A `Disconnect` push with the same code precedes
/// every server-initiated close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    Normal = 1000,
    GoingAway = 1001,
    ProtocolError = 1002,
    UnsupportedData = 1003,
    InvalidPayload = 1007,
    Policy = 1008,
    MessageTooBig = 1009,
    InternalError = 1011,
    Draining = 1012,
    OverCapacity = 1013,
    /// Extension: disconnected by the application through the HTTP API; do not reconnect.
    Disconnected = 4000,
    TokenInvalid = 4001,
    TokenExpired = 4003,
    /// Extension: no traffic (not even a pong) within the idle timeout.
    IdleTimeout = 4004,
    SlowConsumer = 4008,
    RateLimited = 4029,
}

impl CloseCode {
    /// Whether a well-behaved client should reconnect after this close.
    pub fn reconnect(self) -> bool {
        matches!(
            self,
            Self::GoingAway
                | Self::InternalError
                | Self::Draining
                | Self::OverCapacity
                | Self::TokenExpired
                | Self::IdleTimeout
                | Self::SlowConsumer
                | Self::RateLimited
        )
    }

    pub fn code(self) -> u16 {
        self as u16
    }

    /// A short reason, sent in both the `Disconnect` push and the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal close",
            Self::GoingAway => "node shutting down",
            Self::ProtocolError => "websocket protocol violation",
            Self::UnsupportedData => "data the negotiated encoding cannot carry",
            Self::InvalidPayload => "frame does not decode",
            Self::Policy => "policy violation",
            Self::MessageTooBig => "message over the size limit",
            Self::InternalError => "internal error",
            Self::Draining => "node draining",
            Self::OverCapacity => "node over capacity",
            Self::Disconnected => "disconnected by the server",
            Self::TokenInvalid => "token invalid",
            Self::TokenExpired => "token expired",
            Self::IdleTimeout => "idle timeout",
            Self::SlowConsumer => "slow consumer",
            Self::RateLimited => "rate limited",
        }
    }
}
