//! Header values the proxy makes for each request (request ids, deadlines), cut from a block of
//! bytes each worker thread holds instead of being allocated one by one.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Bytes per block: about a hundred request ids for one allocation.
const BLOCK: usize = 4096;

thread_local! {
    /// The rest of the calling thread's current block.
    static REST: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `bytes` as a header value, or `None` if they are not one (RFC 9110 §5.5). Values share their
/// block, which is freed once the last of them is dropped.
pub fn cut(bytes: &[u8]) -> Option<HeaderValue> {
    if bytes.len() > BLOCK / 8 {
        return HeaderValue::from_bytes(bytes).ok();
    }
    REST.with(|rest| {
        let mut rest = rest.borrow_mut();
        if rest.capacity() < bytes.len() {
            *rest = BytesMut::with_capacity(BLOCK);
        }
        rest.extend_from_slice(bytes);
        HeaderValue::from_maybe_shared(rest.split().freeze()).ok()
    })
}

/// `n` in decimal, followed by `unit` (as in gRPC's `100m`), as a header value.
pub fn decimal(n: u64, unit: &[u8]) -> Option<HeaderValue> {
    let mut out = [0u8; 24];
    let mut at = 20;
    let mut n = n;
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let unit = &unit[..unit.len().min(4)];
    out[20..20 + unit.len()].copy_from_slice(unit);
    cut(&out[at..20 + unit.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_their_bytes() {
        assert_eq!(decimal(0, b"").unwrap(), "0");
        assert_eq!(decimal(15_000, b"").unwrap(), "15000");
        assert_eq!(decimal(99_999_999, b"m").unwrap(), "99999999m");
        assert_eq!(
            decimal(u64::MAX, b"").unwrap(),
            u64::MAX.to_string().as_str()
        );
        assert!(cut(b"bad\nvalue").is_none());
        let long = "a".repeat(BLOCK);
        assert_eq!(cut(long.as_bytes()).unwrap(), long.as_str());
    }

    #[test]
    fn values_from_one_block_stay_apart() {
        // More values than one block holds: each keeps its own bytes after the block changes.
        let values: Vec<_> = (0..1000u64).map(|n| decimal(n, b"").unwrap()).collect();
        for (n, v) in values.iter().enumerate() {
            assert_eq!(v.to_str().unwrap(), n.to_string());
        }
    }
}
