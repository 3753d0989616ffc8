//! Length-prefixed protobuf frames: a 4-byte big-endian length, then the
//! message. Blocking `std::io` helpers (the guest agent is thread-based); the
//! broker wraps the same format in its async channel client.

use std::io::{self, Read, Write};

use prost::Message;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame (header + body).
pub fn encode<M: Message>(msg: &M, max: usize) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + len);
    // `len <= max`, and callers keep `max` well under u32::MAX.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(buf)
}

/// Decodes a frame's length prefix, refusing lengths over `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Writes one frame and flushes.
pub fn write<M: Message, W: Write>(w: &mut W, msg: &M, max: usize) -> Result<(), FrameError> {
    w.write_all(&encode(msg, max)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream before a header.
pub fn read<M: Message + Default, R: Read>(r: &mut R, max: usize) -> Result<Option<M>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(header, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(M::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{host_message::Body, Hello, HostMessage};

    #[test]
    fn round_trip() {
        let msg = HostMessage {
            id: 7,
            body: Some(Body::Hello(Hello {
                protocol_version: 1,
            })),
        };
        let bytes = encode(&msg, 1024).expect("encode");
        let back: HostMessage = read(&mut bytes.as_slice(), 1024)
            .expect("read")
            .expect("one frame");
        assert_eq!(back, msg);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0];
        let err = read::<HostMessage, _>(&mut bytes.as_slice(), 1024).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 1024, .. }),
            "{err}"
        );
    }

    #[test]
    fn clean_eof_is_none_and_torn_header_is_error() {
        assert!(read::<HostMessage, _>(&mut [].as_slice(), 10)
            .unwrap()
            .is_none());
        assert!(read::<HostMessage, _>(&mut [0u8, 0].as_slice(), 10).is_err());
    }
}
