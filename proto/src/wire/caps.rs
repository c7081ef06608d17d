//! The frames by which an agent hands a server the capabilities that let
//! it use handles (`rmem_common::capability` has the tokens themselves;
//! the wire carries them as opaque bytes).
//!
//! ```text
//! CAPS     count:u32  reserved:u32  count × { len:u16  reserved:u16  token[len] }
//! CAPS_OK  count:u32  reserved:u32  count × verdict:u8
//! ```

use super::BATCH_PREFIX_LEN;
use super::codec::{FrameWriter, batch_prefix, u16_at, u32_at};
use super::header::{DecodeError, Opcode};

/// Most tokens in one CAPS frame.
pub const MAX_CAPS_PER_FRAME: u32 = 64;
/// Longest token the wire carries.
pub const MAX_CAP_TOKEN_LEN: usize = 1024;

/// The tokens of a CAPS frame, checked for framing only.
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a> {
    count: usize,
    bytes: &'a [u8],
}

impl<'a> Tokens<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.bytes;
        (0..self.count).map(move |_| {
            let len = u16_at(rest, 0) as usize;
            let (token, tail) = rest[4..].split_at(len);
            rest = tail;
            token
        })
    }
}

/// The count of a CAPS or CAPS_OK payload, checked against the limit.
fn count(opcode: Opcode, p: &[u8]) -> Result<usize, DecodeError> {
    if p.len() < BATCH_PREFIX_LEN {
        return Err(DecodeError::Length {
            opcode,
            got: p.len(),
            want: BATCH_PREFIX_LEN,
        });
    }
    if u32_at(p, 4) != 0 {
        return Err(DecodeError::ReservedBits);
    }
    let count = u32_at(p, 0);
    if count > MAX_CAPS_PER_FRAME {
        return Err(DecodeError::BatchTooLarge {
            count,
            max: MAX_CAPS_PER_FRAME,
        });
    }
    Ok(count as usize)
}

pub(super) fn decode_caps(payload: &[u8]) -> Result<Tokens<'_>, DecodeError> {
    let count = count(Opcode::Caps, payload)?;
    let bytes = &payload[BATCH_PREFIX_LEN..];
    let mut rest = bytes;
    for _ in 0..count {
        let short = || DecodeError::Length {
            opcode: Opcode::Caps,
            got: payload.len(),
            want: payload.len() + 1,
        };
        if rest.len() < 4 {
            return Err(short());
        }
        let len = u16_at(rest, 0) as usize;
        if u16_at(rest, 2) != 0 {
            return Err(DecodeError::ReservedBits);
        }
        if len > MAX_CAP_TOKEN_LEN {
            return Err(DecodeError::BadIdentity);
        }
        rest = rest.get(4 + len..).ok_or_else(short)?;
    }
    if !rest.is_empty() {
        return Err(DecodeError::Length {
            opcode: Opcode::Caps,
            got: payload.len(),
            want: payload.len() - rest.len(),
        });
    }
    Ok(Tokens { count, bytes })
}

/// What a server made of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CapVerdict {
    Accepted = 0,
    /// The token does not parse.
    Malformed = 1,
    /// Signed by a key this server was not given (yet): its coordinator
    /// has not published it to the server.
    UnknownKey = 2,
    BadSignature = 3,
    Expired = 4,
    /// Another tenant's, or another agent's than the connection's.
    NotYours = 5,
}

impl CapVerdict {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Accepted,
            1 => Self::Malformed,
            2 => Self::UnknownKey,
            3 => Self::BadSignature,
            4 => Self::Expired,
            5 => Self::NotYours,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYours => "not_yours",
        }
    }
}

impl std::fmt::Display for CapVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdicts of a CAPS_OK, one per token in order.
#[derive(Debug, Clone, Copy)]
pub struct Verdicts<'a> {
    bytes: &'a [u8],
}

impl Verdicts<'_> {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = CapVerdict> + '_ {
        self.bytes
            .iter()
            .map(|&b| CapVerdict::from_u8(b).expect("checked when decoded"))
    }
}

pub(super) fn decode_verdicts(payload: &[u8]) -> Result<Verdicts<'_>, DecodeError> {
    let count = count(Opcode::CapsOk, payload)?;
    let bytes = &payload[BATCH_PREFIX_LEN..];
    if bytes.len() != count {
        return Err(DecodeError::Length {
            opcode: Opcode::CapsOk,
            got: payload.len(),
            want: BATCH_PREFIX_LEN + count,
        });
    }
    if let Some(&b) = bytes.iter().find(|&&b| CapVerdict::from_u8(b).is_none()) {
        return Err(DecodeError::BadStatus(b));
    }
    Ok(Verdicts { bytes })
}

/// Appends a CAPS of `tokens` (at most [`MAX_CAPS_PER_FRAME`], each at
/// most [`MAX_CAP_TOKEN_LEN`] bytes).
pub fn encode_caps<T: AsRef<[u8]>>(buf: &mut Vec<u8>, request_id: u64, tokens: &[T]) {
    debug_assert!(tokens.len() <= MAX_CAPS_PER_FRAME as usize);
    let mut w = FrameWriter::begin(buf, Opcode::Caps, request_id);
    let p = w.payload();
    batch_prefix(p, tokens.len());
    for t in tokens {
        let t = t.as_ref();
        debug_assert!(t.len() <= MAX_CAP_TOKEN_LEN);
        p.extend_from_slice(&(t.len() as u16).to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(t);
    }
    w.finish();
}

/// Appends a CAPS_OK.
pub fn encode_verdicts(buf: &mut Vec<u8>, request_id: u64, verdicts: &[CapVerdict]) {
    let mut w = FrameWriter::begin(buf, Opcode::CapsOk, request_id);
    let p = w.payload();
    batch_prefix(p, verdicts.len());
    p.extend(verdicts.iter().map(|&v| v as u8));
    w.finish();
}

#[cfg(test)]
mod tests {
    use super::super::{FrameHeader, HEADER_LEN, Request, Response};
    use super::*;

    fn frame(buf: &[u8]) -> (FrameHeader, &[u8]) {
        let h = FrameHeader::decode(buf[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
        (h, &buf[HEADER_LEN..])
    }

    #[test]
    fn caps_and_verdicts_round_trip() {
        let tokens: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![], vec![7; 1024]];
        let mut buf = Vec::new();
        encode_caps(&mut buf, 9, &tokens);
        let (h, p) = frame(&buf);
        let Ok(Request::Caps(got)) = Request::decode(&h, p, 0) else {
            panic!("not CAPS");
        };
        assert_eq!(got.iter().collect::<Vec<_>>(), tokens);
        let mut buf = Vec::new();
        let verdicts = [
            CapVerdict::Accepted,
            CapVerdict::NotYours,
            CapVerdict::Expired,
        ];
        encode_verdicts(&mut buf, 9, &verdicts);
        let (h, p) = frame(&buf);
        let Ok(Response::CapsOk(got)) = Response::decode(&h, p, 0) else {
            panic!("not CAPS_OK");
        };
        assert_eq!(got.iter().collect::<Vec<_>>(), verdicts);
    }

    #[test]
    fn bad_caps_frames_are_refused() {
        let mut buf = Vec::new();
        encode_caps(&mut buf, 1, &[b"abc"]);
        let p = buf[HEADER_LEN..].to_vec();
        // Every truncation, a trailing byte, a reserved bit, a long count.
        for n in 0..p.len() {
            assert!(decode_caps(&p[..n]).is_err(), "{n} bytes decoded");
        }
        let mut long = p.clone();
        long.push(0);
        assert!(decode_caps(&long).is_err());
        let mut reserved = p.clone();
        reserved[10] = 1;
        assert!(decode_caps(&reserved).is_err());
        let mut many = p.clone();
        many[0..4].copy_from_slice(&(MAX_CAPS_PER_FRAME + 1).to_le_bytes());
        assert!(decode_caps(&many).is_err());
        assert!(decode_verdicts(&[1, 0, 0, 0, 0, 0, 0, 0, 9]).is_err());
    }
}
