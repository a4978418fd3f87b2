//! The upstream-response fuzz target's code, shared with `tests/fuzz_regressions.rs` so that a
//! replayed input runs exactly what the fuzzer ran.

use bytes::BytesMut;
use outrigger::proxy::h1::{read_frame, read_head, Framing};

/// What reading a response gave: its status, its body's bytes and trailers, whether it failed,
/// and whether its body ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub status: Option<u16>,
    pub data: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    pub failed: bool,
    pub ended: bool,
}

/// Checks one input: the first byte says whether the request was `HEAD` (its top bit) and where
/// the rest is split into two reads; what the reader makes of the two reads must be what it
/// makes of the whole, and the body can never hold more bytes than came in. Panics if not.
/// Returns whether there was anything to check.
pub fn run(data: &[u8]) -> bool {
    let Some((&first, bytes)) = data.split_first() else {
        return false;
    };
    check_split(
        bytes,
        first & 0x80 != 0,
        usize::from(first & 0x7f) % (bytes.len() + 1),
    );
    true
}

/// The reading of `bytes` whole equals their reading in two parts split at `at`.
pub fn check_split(bytes: &[u8], head: bool, at: usize) {
    let whole = read(&[bytes], head);
    assert!(
        whole.data.len() <= bytes.len(),
        "a body longer than its input"
    );
    let split = read(&[&bytes[..at], &bytes[at..]], head);
    assert_eq!(whole, split, "split at {at}");
}

/// Reads `pieces`, arriving one after the other, as one response.
pub fn read(pieces: &[&[u8]], head: bool) -> Read {
    let mut rd = BytesMut::new();
    let mut out = Read::default();
    let mut framing: Option<Framing> = None;
    for piece in pieces {
        rd.extend_from_slice(piece);
        loop {
            let Some(f) = framing.as_mut() else {
                match read_head(&mut rd, head) {
                    Ok(Some(h)) => {
                        out.status = Some(h.parts.status.as_u16());
                        framing = Some(h.framing);
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.failed = true;
                        return out;
                    }
                }
            };
            match read_frame(&mut rd, f) {
                Ok(Some(frame)) => match frame.into_data() {
                    Ok(d) => out.data.extend_from_slice(&d),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            out.trailers.extend(
                                t.iter()
                                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())),
                            );
                        }
                    }
                },
                Ok(None) => {
                    if f.ended() {
                        out.ended = true;
                        return out;
                    }
                    break;
                }
                Err(_) => {
                    out.failed = true;
                    return out;
                }
            }
        }
    }
    out
}
