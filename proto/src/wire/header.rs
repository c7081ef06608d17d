//! Frame header, opcodes and status codes.

use super::MAX_BATCH_PAGES_HARD;

/// Length of a [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 16;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 0x01,
    Put = 0x02,
    Get = 0x03,
    Free = 0x04,
    Stat = 0x05,
    RdmaConnect = 0x06,
    PutStaged = 0x07,
    Locate = 0x08,
    Caps = 0x09,
    HelloOk = 0x81,
    PutOk = 0x82,
    GetOk = 0x83,
    FreeOk = 0x84,
    StatOk = 0x85,
    RdmaAccept = 0x86,
    Located = 0x87,
    CapsOk = 0x88,
    Error = 0xFF,
}

impl Opcode {
    /// The opcode for a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::Put,
            0x03 => Self::Get,
            0x04 => Self::Free,
            0x05 => Self::Stat,
            0x06 => Self::RdmaConnect,
            0x07 => Self::PutStaged,
            0x08 => Self::Locate,
            0x09 => Self::Caps,
            0x81 => Self::HelloOk,
            0x82 => Self::PutOk,
            0x83 => Self::GetOk,
            0x84 => Self::FreeOk,
            0x85 => Self::StatOk,
            0x86 => Self::RdmaAccept,
            0x87 => Self::Located,
            0x88 => Self::CapsOk,
            0xFF => Self::Error,
            _ => return None,
        })
    }

    /// Whether a client sends this opcode.
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }
}

/// The fixed 16-byte prefix of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes (header not included).
    pub len: u32,
    pub opcode: Opcode,
    /// Chosen by the client, echoed in the response.
    pub request_id: u64,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4] = self.opcode as u8;
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b
    }

    /// Decodes a header and checks its payload length against `max_len`.
    pub fn decode(b: &[u8; HEADER_LEN], max_len: u32) -> Result<Self, DecodeError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let opcode = Opcode::from_u8(b[4]).ok_or(DecodeError::UnknownOpcode(b[4]))?;
        if b[5] != 0 || b[6] != 0 || b[7] != 0 {
            return Err(DecodeError::ReservedBits);
        }
        if len > max_len {
            return Err(DecodeError::FrameTooLarge { len, max: max_len });
        }
        let request_id = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        Ok(Self {
            len,
            opcode,
            request_id,
        })
    }
}

/// Outcome of one page in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageStatus {
    Ok = 0,
    /// No page is stored under that handle.
    NotFound = 1,
    /// The server's pool is full.
    NoSpace = 2,
    /// The tenant's quota is used up.
    QuotaExceeded = 3,
    /// The page's data did not match its checksum; nothing was stored.
    BadChecksum = 4,
    /// The stored copy failed its checksum on the server; it is not served.
    Corrupt = 5,
    /// The handle is outside the capabilities the connection presented:
    /// nothing was done to it.
    Denied = 6,
}

impl PageStatus {
    /// The status for a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::NoSpace,
            3 => Self::QuotaExceeded,
            4 => Self::BadChecksum,
            5 => Self::Corrupt,
            6 => Self::Denied,
            _ => return None,
        })
    }

    /// A short stable name, for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::NoSpace => "no_space",
            Self::QuotaExceeded => "quota_exceeded",
            Self::BadChecksum => "bad_checksum",
            Self::Corrupt => "corrupt",
            Self::Denied => "denied",
        }
    }
}

impl std::fmt::Display for PageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection is being closed (the code of an ERROR frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame did not decode.
    BadFrame = 1,
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion = 2,
    /// Unknown tenant or wrong credential.
    AuthFailed = 3,
    /// A frame's length exceeds the negotiated limit.
    FrameTooLarge = 4,
    /// A batch has more pages than the negotiated limit.
    BatchTooLarge = 5,
    /// A request arrived before a successful HELLO.
    NotAuthenticated = 6,
    /// The server is shutting down; reconnect elsewhere or later.
    ShuttingDown = 7,
    /// The peer sent nothing for too long.
    Timeout = 8,
    /// The server has too many connections.
    Busy = 9,
    /// RDMA was asked for but this server cannot set it up; use TCP.
    RdmaUnavailable = 10,
    /// Anything else.
    Internal = 100,
}

impl ErrorCode {
    /// The code for a number; unknown numbers become [`ErrorCode::Internal`].
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::BadFrame,
            2 => Self::UnsupportedVersion,
            3 => Self::AuthFailed,
            4 => Self::FrameTooLarge,
            5 => Self::BatchTooLarge,
            6 => Self::NotAuthenticated,
            7 => Self::ShuttingDown,
            8 => Self::Timeout,
            9 => Self::Busy,
            10 => Self::RdmaUnavailable,
            _ => Self::Internal,
        }
    }

    /// A short stable name, for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::AuthFailed => "auth_failed",
            Self::FrameTooLarge => "frame_too_large",
            Self::BatchTooLarge => "batch_too_large",
            Self::NotAuthenticated => "not_authenticated",
            Self::ShuttingDown => "shutting_down",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
            Self::RdmaUnavailable => "rdma_unavailable",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("reserved header bits are set")]
    ReservedBits,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("{opcode:?} payload is {got} bytes, expected {want}")]
    Length {
        opcode: Opcode,
        got: usize,
        want: usize,
    },
    #[error("batch of {count} pages exceeds the limit of {max}")]
    BatchTooLarge { count: u32, max: u32 },
    #[error("bad magic in HELLO")]
    BadMagic,
    #[error("tenant name or credential too long or not UTF-8")]
    BadIdentity,
    #[error("unknown page status {0}")]
    BadStatus(u8),
    #[error("unexpected {0:?} frame")]
    Unexpected(Opcode),
}

impl DecodeError {
    /// The ERROR code a server answers this decode failure with.
    pub fn error_code(&self) -> super::ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => super::ErrorCode::FrameTooLarge,
            Self::BatchTooLarge { .. } => super::ErrorCode::BatchTooLarge,
            _ => super::ErrorCode::BadFrame,
        }
    }
}

/// Limits both sides agree on in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_pages: u32,
    pub max_frame_bytes: u32,
}

impl Limits {
    /// Limits for a batch size, clamped to the hard maximum.
    pub fn for_batch(pages: u32) -> Self {
        let pages = pages.clamp(1, MAX_BATCH_PAGES_HARD);
        Self {
            max_batch_pages: pages,
            max_frame_bytes: super::max_frame_for_batch(pages),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::for_batch(super::DEFAULT_MAX_BATCH_PAGES)
    }
}
