//! What the process benchmarks share: the release binary, child processes killed when dropped,
//! free loopback ports.
#![allow(dead_code)] // each bench uses a different part

use std::path::PathBuf;
use std::process::Child;

/// A child process, killed when dropped (also when a bench fails half-way).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free port on `ip` (bound and released: the process binds it right after).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `outrigger` binary: `OUTRIGGER_BIN`, or the release build.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("OUTRIGGER_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/outrigger");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release` first",
        p.display()
    );
    p
}
