//! The load benchmark: Outrigger against a direct connection and against HAProxy, in one run.
//!
//! Run it through `benches/load.sh`, which installs HAProxy, wrk and h2load and builds the
//! release binary. A HAProxy instance that answers `200 ok` itself is the origin; a second
//! HAProxy and Outrigger proxy to it with equivalent configs. Every figure is the median of
//! `OUTRIGGER_LOAD_ROUNDS` rounds (default 3). Rows:
//!
//! 1. saturation throughput, HTTP/1.1 keep-alive, 64 connections (wrk);
//! 2. latency at fixed rates (2k and 5k req/s, open loop, generated here): p50, p99, p99.9;
//! 3. CPU seconds of the proxy process per 100,000 requests at 2k req/s (from /proc);
//! 4. RSS idle and with 10,000 idle keep-alive connections;
//! 5. HTTP/2 multiplexed throughput (h2load);
//! 6. L4 TCP bulk throughput;
//! 7. rows 1–3 with Outrigger's default resilience stack (retries, budget, breaker, outlier
//!    detection, bulkhead, timeouts) rather than a minimal one.
//!
//! It prints a table and machine-readable lines such as `ratio cpu_per_req outrigger/haproxy 0.83`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds so far, from /proc/PID/stat.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks / 100.0
    }

    /// Resident memory in MB, from /proc/PID/status.
    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc {
        child: cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run benches/load.sh)")),
    }
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

fn haproxy(dir: &Path, name: &str, cfg: &str) -> Proc {
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, cfg).unwrap();
    spawn(Command::new("haproxy").args(["-f", path.to_str().unwrap()]))
}

const GLOBAL: &str = "global\n  fd-hard-limit 20000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n";

struct Targets {
    direct: u16,
    haproxy: u16,
    haproxy_h2: u16,
    haproxy_tcp: u16,
    sink: u16,
}

fn outrigger(
    dir: &Path,
    bin: &Path,
    origin: u16,
    sink: u16,
    minimal: bool,
) -> (Proc, u16, u16, u16) {
    let (http, tcp, admin) = (free_port(), free_port(), free_port());
    let route_policy = if minimal {
        "        timeout: 0s\n        retry: { attempts: 1 }\n"
    } else {
        ""
    };
    let cluster_policy = if minimal {
        "    circuit_breaker: { enabled: false }\n    outlier_detection: { enabled: false }\n    bulkhead: { max_concurrent: 100000, max_pending: 0 }\n"
    } else {
        ""
    };
    let cfg = format!(
        "admin: {{ address: 127.0.0.1:{admin} }}
listeners:
  - name: http
    address: 127.0.0.1:{http}
    routes:
      - name: all
        cluster: origin
{route_policy}  - name: tcp
    address: 127.0.0.1:{tcp}
    protocol: tcp
    cluster: sink
clusters:
  - name: origin
    endpoints: [127.0.0.1:{origin}]
{cluster_policy}  - name: sink
    endpoints: [127.0.0.1:{sink}]
"
    );
    let path = dir.join(if minimal {
        "minimal.yaml"
    } else {
        "default.yaml"
    });
    std::fs::write(&path, cfg).unwrap();
    let p = spawn(Command::new(bin).args(["run", "--config", path.to_str().unwrap()]));
    (p, http, tcp, admin)
}

/// wrk saturation: requests per second.
fn wrk(port: u16, secs: u32) -> f64 {
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c64",
            &format!("-d{secs}s"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .expect("wrk (run benches/load.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// h2load: requests per second over 4 connections × 32 streams.
fn h2load(port: u16) -> f64 {
    let out = Command::new("h2load")
        .args([
            "-n",
            "200000",
            "-c",
            "4",
            "-m",
            "32",
            "-t",
            "1",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .expect("h2load (run benches/load.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

type H1 = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// Open-loop load at `rate` for `secs`: sorted latencies and the number answered 200.
async fn fixed_rate(port: u16, rate: u32, secs: f64) -> (Vec<Duration>, usize) {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: H1 = Client::builder(TokioExecutor::new()).build(connector);
    let url = format!("http://127.0.0.1:{port}/");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    while Instant::now() < end {
        tick.tick().await;
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let start = Instant::now();
            let req = Request::get(url).body(Empty::new()).unwrap();
            let ok = match client.request(req).await {
                Ok(r) => {
                    let ok = r.status() == 200;
                    let _ = r.into_body().collect().await;
                    ok
                }
                Err(_) => false,
            };
            (start.elapsed(), ok)
        });
    }
    let mut lat = Vec::new();
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (d, good) = r.unwrap();
        lat.push(d);
        ok += usize::from(good);
    }
    lat.sort();
    (lat, ok)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A TCP server that reads and discards everything.
async fn sink() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"done").await;
            });
        }
    });
    port
}

/// Pushes `mb` megabytes through `port`: MB/s.
async fn bulk(port: u16, mb: usize) -> f64 {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let chunk = vec![7u8; 1024 * 1024];
    let start = Instant::now();
    for _ in 0..mb {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut done = [0u8; 4];
    let _ = s.read_exact(&mut done).await;
    mb as f64 / start.elapsed().as_secs_f64()
}

/// Opens `n` keep-alive connections that each made one request, and keeps them.
async fn idle_connections(port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            break;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf).await;
        conns.push(s);
    }
    conns
}

fn main() {
    let rounds: usize = std::env::var("OUTRIGGER_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bin: PathBuf = std::env::var("OUTRIGGER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/outrigger"));
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sink_port = sink().await;
        let t = Targets {
            direct: free_port(),
            haproxy: free_port(),
            haproxy_h2: free_port(),
            haproxy_tcp: free_port(),
            sink: sink_port,
        };
        let _origin = haproxy(
            dir.path(),
            "origin",
            &format!(
                "{GLOBAL}frontend origin\n  bind 127.0.0.1:{} proto h2\n  bind 127.0.0.1:{}\n  http-request return status 200 content-type text/plain string ok\n",
                free_port(),
                t.direct
            ),
        );
        let ha = haproxy(
            dir.path(),
            "proxy",
            &format!(
                "{GLOBAL}frontend fe\n  bind 127.0.0.1:{}\n  bind 127.0.0.1:{} proto h2\n  default_backend be\nbackend be\n  http-reuse always\n  server o 127.0.0.1:{}\nlisten tcp\n  mode tcp\n  bind 127.0.0.1:{}\n  server s 127.0.0.1:{}\n",
                t.haproxy, t.haproxy_h2, t.direct, t.haproxy_tcp, t.sink
            ),
        );
        let (min, min_http, min_tcp, _) = outrigger(dir.path(), &bin, t.direct, t.sink, true);
        let (def, def_http, _, _) = outrigger(dir.path(), &bin, t.direct, t.sink, false);
        for p in [t.direct, t.haproxy, t.haproxy_h2, t.haproxy_tcp, min_http, min_tcp, def_http] {
            wait_port(p).await;
        }
        let rows: [(&str, u16, Option<&Proc>); 4] = [
            ("direct", t.direct, None),
            ("haproxy", t.haproxy, Some(&ha)),
            ("outrigger", min_http, Some(&min)),
            ("outrigger+resilience", def_http, Some(&def)),
        ];
        println!("rounds: {rounds}; every figure is the median\n");
        println!("| target | sat. req/s (64 conns) | p50 / p99 / p99.9 ms at 2k/s | p50 / p99 / p99.9 ms at 5k/s | CPU s per 100k req at 2k/s | RSS idle MB |");
        println!("|---|---|---|---|---|---|");
        let mut cpu_of = std::collections::HashMap::new();
        let mut sat_of = std::collections::HashMap::new();
        let mut p99_of = std::collections::HashMap::new();
        for (name, port, proc_) in rows {
            let idle_rss = proc_.map(Proc::rss_mb).unwrap_or(0.0);
            let mut sat = Vec::new();
            let mut lat2 = (Vec::new(), Vec::new(), Vec::new());
            let mut lat5 = (Vec::new(), Vec::new(), Vec::new());
            let mut cpu = Vec::new();
            for _ in 0..rounds {
                sat.push(wrk(port, 5));
                let before = proc_.map(Proc::cpu).unwrap_or(0.0);
                let (l, ok) = fixed_rate(port, 2000, 5.0).await;
                let after = proc_.map(Proc::cpu).unwrap_or(0.0);
                cpu.push((after - before) / ok.max(1) as f64 * 100_000.0);
                lat2.0.push(pct(&l, 50.0));
                lat2.1.push(pct(&l, 99.0));
                lat2.2.push(pct(&l, 99.9));
                let (l, _) = fixed_rate(port, 5000, 3.0).await;
                lat5.0.push(pct(&l, 50.0));
                lat5.1.push(pct(&l, 99.0));
                lat5.2.push(pct(&l, 99.9));
            }
            let (s, c) = (median(sat), median(cpu));
            let p99 = median(lat2.1.clone());
            println!(
                "| {name} | {s:.0} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {} |",
                median(lat2.0),
                p99,
                median(lat2.2),
                median(lat5.0),
                median(lat5.1),
                median(lat5.2),
                if proc_.is_some() { format!("{c:.3}") } else { "-".into() },
                if proc_.is_some() { format!("{idle_rss:.1}") } else { "-".into() },
            );
            cpu_of.insert(name, c);
            sat_of.insert(name, s);
            p99_of.insert(name, p99);
        }
        // Idle keep-alive connections.
        let mut idle_rows = Vec::new();
        for (name, port, p) in [("haproxy", t.haproxy, &ha), ("outrigger", min_http, &min)] {
            let before = p.rss_mb();
            let conns = idle_connections(port, 10_000).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = p.rss_mb();
            idle_rows.push(format!(
                "| {name} | {} | {before:.1} | {after:.1} | {:.1} |",
                conns.len(),
                (after - before) * 1024.0 / conns.len().max(1) as f64
            ));
            drop(conns);
        }
        println!("\n| idle keep-alive | connections | RSS before MB | RSS after MB | KB per connection |");
        println!("|---|---|---|---|---|");
        for r in &idle_rows {
            println!("{r}");
        }
        // HTTP/2 and TCP.
        let h2_ha = median((0..rounds).map(|_| h2load(t.haproxy_h2)).collect());
        let h2_or = median((0..rounds).map(|_| h2load(min_http)).collect());
        let mut bulk_rows = Vec::new();
        for (name, port) in [("direct", t.sink), ("haproxy", t.haproxy_tcp), ("outrigger", min_tcp)] {
            let mut v = Vec::new();
            for _ in 0..rounds {
                v.push(bulk(port, 1024).await);
            }
            bulk_rows.push((name, median(v)));
        }
        println!("\n| h2load (4 conns x 32 streams) | req/s |\n|---|---|\n| haproxy | {h2_ha:.0} |\n| outrigger | {h2_or:.0} |");
        println!("\n| TCP bulk (1 GiB) | MB/s |\n|---|---|");
        for (n, v) in &bulk_rows {
            println!("| {n} | {v:.0} |");
        }
        println!();
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        for o in ["outrigger", "outrigger+resilience"] {
            println!("ratio cpu_per_req {o}/haproxy {:.2}", ratio(cpu_of[o], cpu_of["haproxy"]));
            println!("ratio saturation {o}/haproxy {:.2}", ratio(sat_of[o], sat_of["haproxy"]));
            println!(
                "ratio added_p99_2k {o}/haproxy {:.2}",
                ratio(p99_of[o] - p99_of["direct"], p99_of["haproxy"] - p99_of["direct"])
            );
        }
        println!("ratio h2_throughput outrigger/haproxy {:.2}", ratio(h2_or, h2_ha));
        println!(
            "ratio tcp_bulk outrigger/direct {:.2}",
            ratio(bulk_rows[2].1, bulk_rows[0].1)
        );
    });
}
