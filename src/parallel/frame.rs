//! The control plane's wire format: every message between ranks is a frame of a known type and
//! a bounded length (`type: u8`, `length: u64` little-endian, then the payload), so that a
//! stranger's bytes cannot make a rank allocate what the wire claims, nor pass one message
//! off as another.

use std::io::{self, Read, Write};

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    /// A rank's opening message ([`super::handshake::Handshake`]).
    Handshake = 1,
    /// Rank 0 took the rank into the group.
    Accept = 2,
    /// Rank 0 refused the rank; the payload says why (UTF-8).
    Reject = 3,
    /// Rank 0's hello (the rank layer's `ranks::Hello`, JSON).
    Hello = 4,
    /// One step's inputs (JSON).
    Step = 5,
    /// A collective's buffer (raw bytes of a length both sides know).
    Data = 6,
}

/// Bytes of a frame header: its type and its length.
pub const HEADER_BYTES: usize = 9;

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameType::Handshake,
            2 => FrameType::Accept,
            3 => FrameType::Reject,
            4 => FrameType::Hello,
            5 => FrameType::Step,
            6 => FrameType::Data,
            _ => return None,
        })
    }

    /// The largest payload a frame of this type may have (a step of thousands of tokens and
    /// long block tables is a few MB; collectives pass their exact length instead).
    pub fn max_len(self) -> u64 {
        match self {
            FrameType::Handshake | FrameType::Reject => 4 << 10,
            FrameType::Accept => 0,
            FrameType::Hello => 64 << 10,
            FrameType::Step => 256 << 20,
            FrameType::Data => 16 << 30,
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, ty: FrameType, payload: &[u8]) -> io::Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    header[0] = ty as u8;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads a frame header, checking that it announces a frame of type `want` no longer than
/// `max` bytes (and than the type's own limit); returns the payload length.
pub fn read_header(r: &mut impl Read, want: FrameType, max: u64) -> io::Result<usize> {
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header)?;
    let len = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
    match FrameType::from_byte(header[0]) {
        Some(ty) if ty == want => {}
        Some(ty) => return Err(invalid(format!("expected a {want:?} frame, got {ty:?}"))),
        None => return Err(invalid(format!("not a tulu frame (type byte {})", header[0]))),
    }
    let max = max.min(want.max_len());
    if len > max {
        return Err(invalid(format!("a {want:?} frame of {len} bytes (at most {max})")));
    }
    usize::try_from(len).map_err(|_| invalid(format!("a frame of {len} bytes")))
}

/// Reads a payload of `len` bytes (as [`read_header`] announced it).
pub fn read_payload(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads one frame of type `want` of at most `max` bytes.
pub fn read_frame(r: &mut impl Read, want: FrameType, max: u64) -> io::Result<Vec<u8>> {
    let len = read_header(r, want, max)?;
    read_payload(r, len)
}

/// Reads one `Data` frame of exactly `len` bytes (a collective's buffer, whose size both sides
/// know).
pub fn read_data(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let got = read_header(r, FrameType::Data, len as u64)?;
    if got != len {
        return Err(invalid(format!("a collective buffer of {got} bytes, expected {len}")));
    }
    read_payload(r, got)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused_before_any_allocation() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameType::Step, b"{\"x\":1}").unwrap();
        assert_eq!(read_frame(&mut wire.as_slice(), FrameType::Step, 1 << 20).unwrap(), b"{\"x\":1}");
        assert!(read_frame(&mut wire.as_slice(), FrameType::Hello, 1 << 20).is_err(), "wrong type");
        assert!(read_frame(&mut wire.as_slice(), FrameType::Step, 3).is_err(), "over the caller's limit");
        // 2^62 bytes announced: refused from the header alone.
        let mut huge = vec![FrameType::Data as u8];
        huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
        let e = read_data(&mut huge.as_slice(), 8).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
        let e = read_frame(&mut [0xffu8; 9].as_slice(), FrameType::Handshake, 100).unwrap_err();
        assert!(e.to_string().contains("not a tulu frame"), "{e}");
        let mut short = Vec::new();
        write_frame(&mut short, FrameType::Data, &[1, 2, 3, 4]).unwrap();
        assert!(read_data(&mut short.as_slice(), 8).is_err(), "a collective buffer of the wrong size");
        assert!(read_frame(&mut &short[..5], FrameType::Data, 8).is_err(), "cut off");
    }
}
