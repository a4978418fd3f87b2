//! Header values the proxy makes for each request (request ids, deadlines), cut from a block of
//! bytes each worker thread holds instead of being allocated one by one, the lookup of the
//! headers it reads on every request, and the header maps of upstream answers, kept per thread
//! once their head is written.

use std::cell::RefCell;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Up to this many values, a header is looked up by comparing names rather than by hashing.
const SCANNED: usize = 8;

/// The first value of `name` in `headers`, as [`HeaderMap::get`] gives it. Each request and
/// answer is looked up a dozen times (gRPC status and timeout, deadlines, request id, content
/// type), almost always for a header it does not have, and a map holds a handful: comparing
/// names, most of them standard ones that differ from a custom name at their first word, costs
/// a fraction of hashing the name, which `get` does on every call.
pub fn find<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    // The names alone, since walking the map's values follows each entry's chain of extra
    // values; a name that is there is then looked up as `get` does.
    if headers.len() <= SCANNED && !headers.keys().any(|k| k == name) {
        return None;
    }
    headers.get(name)
}

/// Emptied header maps each thread keeps.
const MAPS: usize = 64;
/// A map that held more fields than this is let go rather than kept.
const MAP_MOST: usize = 64;

thread_local! {
    /// Header maps of answers already written, emptied, for the next answers read.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// A header map with room for `n` fields: one this thread kept, or a new one. An upstream
/// answer's map is two allocations (its index and its entries) that its downstream write frees
/// again; with many requests in flight, glibc's per-thread cache runs out for those sizes.
pub fn take_map(n: usize) -> HeaderMap {
    match SPARE_MAPS.with(|m| m.borrow_mut().pop()) {
        Some(mut map) => {
            map.reserve(n);
            map
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Keeps `map`, emptied, for [`take_map`] on this thread.
pub fn give_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAP_MOST {
        return;
    }
    map.clear();
    SPARE_MAPS.with(|m| {
        let mut spare = m.borrow_mut();
        if spare.len() < MAPS {
            spare.push(map);
        }
    });
}

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
    fn a_kept_map_comes_back_empty_with_its_room_and_a_huge_one_is_not_kept() {
        // Each test runs on a thread of its own: the spare list starts empty.
        let mut map = HeaderMap::with_capacity(20);
        map.insert("x-a", HeaderValue::from_static("1"));
        map.append("x-a", HeaderValue::from_static("2"));
        let room = map.capacity();
        give_map(map);
        let again = take_map(4);
        assert!(again.is_empty(), "no field of the last answer is left");
        assert_eq!(again.capacity(), room, "the same map, not a new one");
        assert_eq!(
            take_map(4).capacity(),
            HeaderMap::<HeaderValue>::with_capacity(4).capacity()
        );
        give_map(HeaderMap::<HeaderValue>::with_capacity(MAP_MOST * 2));
        assert!(
            take_map(1).capacity() < MAP_MOST,
            "a map grown huge is let go"
        );
    }

    #[test]
    fn find_gives_what_get_gives_in_small_and_large_maps() {
        let names = [
            HeaderName::from_static("grpc-status"),
            http::header::CONTENT_TYPE,
            HeaderName::from_static("x-request-id"),
            http::header::HOST,
            HeaderName::from_static("grpc-statu"),
        ];
        for extra in [0, 3, 20] {
            let mut h = HeaderMap::new();
            h.insert(http::header::HOST, HeaderValue::from_static("a"));
            h.append("x-request-id", HeaderValue::from_static("first"));
            h.append("x-request-id", HeaderValue::from_static("second"));
            h.insert("grpc-status", HeaderValue::from_static("14"));
            for i in 0..extra {
                h.insert(
                    HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("-"),
                );
            }
            for name in &names {
                assert_eq!(
                    find(&h, name),
                    h.get(name),
                    "{name} among {} values",
                    h.len()
                );
            }
        }
        assert_eq!(find(&HeaderMap::new(), &http::header::CONTENT_TYPE), None);
    }

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
