//! The load benchmark: Outrigger against a direct connection and against HAProxy, in one run.
//!
//! Run it through `benches/load.sh`, which installs HAProxy, wrk and h2load and builds the
//! release binary. A HAProxy instance that answers `200 ok` itself is the origin; a second
//! HAProxy and Outrigger proxy to it with equivalent configs. Each proxy under test is pinned to
//! core 1 with one thread (HAProxy `nbthread 1`, Outrigger `--workers 1`); the origin and every
//! load generator run on core 0, so a proxy's CPU figures are its own. Every figure is the median
//! of `OUTRIGGER_LOAD_ROUNDS` rounds (default 3). Rows:
//!
//! 1. saturation throughput, HTTP/1.1 keep-alive, 64 connections (wrk), and CPU per request there;
//! 2. latency and CPU per request at fixed rates (2k and 5k req/s, open loop, generated here);
//! 3. system calls (`perf stat`) and context switches (/proc) per request at 3k req/s;
//! 4. the same proxies with two threads on both cores, saturated;
//! 5. RSS idle and with 5,000 idle keep-alive connections;
//! 6. HTTP/2 multiplexed throughput (h2load);
//! 7. L4 TCP bulk throughput.
//!
//! `OUTRIGGER_BASELINE_BIN=path/to/older/outrigger` adds that build, with the default stack, as a
//! row of the same run (`baseline+resilience`): a before/after comparison on equal terms.
//!
//! Outrigger runs twice: with every policy off, and with its default resilience stack (retries,
//! budget, breaker, outlier detection, bulkhead, timeouts), the row the targets apply to. It
//! prints tables and machine-readable lines such as `ratio cpu_per_req_2k
//! outrigger+resilience/haproxy 0.83`.
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

    /// Panics, naming it, if the process has exited: a proxy that could not start would
    /// otherwise leave its row measuring nothing, or another process.
    fn check_running(&self, name: &str) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        assert!(
            matches!(state, Some(s) if s != "Z" && s != "X"),
            "{name} (pid {}) is not running",
            self.pid()
        );
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

/// A port free now and not handed out before in this run. The kernel may give a port that was
/// bound and let go again to the next `bind(0)`; two processes of the run given one port made
/// the second fail to start, and its row measured whatever answered there.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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

/// The core the proxies under test run on; the origin and the load generators use the other.
const PROXY_CORE: &str = "1";
const LOAD_CORE: &str = "0";

fn haproxy(dir: &Path, name: &str, cores: &str, cfg: &str) -> Proc {
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, cfg).unwrap();
    spawn(Command::new("taskset").args(["-c", cores, "haproxy", "-f", path.to_str().unwrap()]))
}

fn global(threads: u32) -> String {
    format!("global\n  nbthread {threads}\n  fd-hard-limit 40000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n")
}

struct Targets {
    direct: u16,
    haproxy: u16,
    haproxy_h2: u16,
    haproxy_tcp: u16,
    sink: u16,
}

/// An Outrigger process: `minimal` turns every policy off; `workers` threads on `cores`.
fn outrigger(
    dir: &Path,
    bin: &Path,
    origin: u16,
    sink: u16,
    minimal: bool,
    workers: u16,
    cores: &str,
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
    let path = dir.join(format!("outrigger-{minimal}-{workers}.yaml"));
    std::fs::write(&path, cfg).unwrap();
    let p = spawn(Command::new("taskset").args([
        "-c",
        cores,
        bin.to_str().unwrap(),
        "run",
        "--workers",
        &workers.to_string(),
        "--config",
        path.to_str().unwrap(),
    ]));
    (p, http, tcp, admin)
}

/// wrk saturation: requests per second.
fn wrk(port: u16, secs: u32) -> f64 {
    let out = Command::new("taskset")
        .args([
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
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
    let out = Command::new("taskset")
        .args([
            "-c",
            LOAD_CORE,
            "h2load",
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

/// Context switches of every thread of `pid` so far, from /proc.
fn context_switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Counts the system calls of `pid` while `load` runs (`perf stat`), or `None` without perf.
async fn syscalls_during<F: std::future::Future<Output = usize>>(
    pid: u32,
    load: F,
) -> (Option<f64>, usize) {
    let out = std::env::temp_dir().join(format!("outrigger-perf-{pid}.txt"));
    let perf = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = load.await;
    let Ok(perf) = perf else {
        return (None, answered);
    };
    // perf prints its counts when interrupted.
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait_with_output();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let count = text
        .lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next()?.trim().parse::<f64>().ok());
    (count, answered)
}

/// One target's figures, each the median over the rounds.
#[derive(Default, Clone)]
struct Figures {
    sat: f64,
    cpu_sat: f64,
    cpu_2k: f64,
    cpu_5k: f64,
    p50_2k: f64,
    p99_2k: f64,
    p999_2k: f64,
    p50_5k: f64,
    p99_5k: f64,
    p999_5k: f64,
    syscalls: Option<f64>,
    switches: f64,
    rss_idle: f64,
}

/// CPU microseconds of `p` per request while `answered` requests were served.
fn per_request_us(p: Option<&Proc>, before: f64, answered: f64) -> f64 {
    p.map_or(0.0, |p| (p.cpu() - before) / answered.max(1.0) * 1e6)
}

/// One round of the rate figures for one target.
async fn round(port: u16, p: Option<&Proc>) -> Figures {
    let mut f = Figures::default();
    let before = p.map_or(0.0, Proc::cpu);
    let secs = 5;
    f.sat = wrk(port, secs);
    f.cpu_sat = per_request_us(p, before, f.sat * f64::from(secs));
    let before = p.map_or(0.0, Proc::cpu);
    let (l, ok) = fixed_rate(port, 2000, 5.0).await;
    f.cpu_2k = per_request_us(p, before, ok as f64);
    (f.p50_2k, f.p99_2k, f.p999_2k) = (pct(&l, 50.0), pct(&l, 99.0), pct(&l, 99.9));
    let before = p.map_or(0.0, Proc::cpu);
    let (l, ok) = fixed_rate(port, 5000, 3.0).await;
    f.cpu_5k = per_request_us(p, before, ok as f64);
    (f.p50_5k, f.p99_5k, f.p999_5k) = (pct(&l, 50.0), pct(&l, 99.0), pct(&l, 99.9));
    f
}

/// The medians of `rounds`, with system calls and context switches per request at a fixed 3k
/// req/s measured in a pass of their own (perf's tracepoint adds a little to every call).
async fn summarize(rounds: &[Figures], port: u16, p: Option<&Proc>) -> Figures {
    let m = |get: fn(&Figures) -> f64| median(rounds.iter().map(get).collect());
    let mut f = Figures {
        sat: m(|f| f.sat),
        cpu_sat: m(|f| f.cpu_sat),
        cpu_2k: m(|f| f.cpu_2k),
        cpu_5k: m(|f| f.cpu_5k),
        p50_2k: m(|f| f.p50_2k),
        p99_2k: m(|f| f.p99_2k),
        p999_2k: m(|f| f.p999_2k),
        p50_5k: m(|f| f.p50_5k),
        p99_5k: m(|f| f.p99_5k),
        p999_5k: m(|f| f.p999_5k),
        ..Figures::default()
    };
    if let Some(p) = p {
        let cs = context_switches(p.pid());
        let (calls, ok) =
            syscalls_during(p.pid(), async { fixed_rate(port, 3000, 3.0).await.1 }).await;
        f.switches = (context_switches(p.pid()) - cs) / ok.max(1) as f64;
        f.syscalls = calls.map(|c| c / ok.max(1) as f64);
    }
    f
}

fn main() {
    let rounds: usize = std::env::var("OUTRIGGER_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bin: PathBuf = std::env::var("OUTRIGGER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/outrigger"));
    // The load generators (this process, wrk, h2load) and the origin keep to one core, the
    // proxy under test to the other, so its CPU figures are its own.
    let _ = Command::new("taskset")
        .args(["-c", "-p", LOAD_CORE, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
            LOAD_CORE,
            &format!(
                "{}frontend origin\n  bind 127.0.0.1:{} proto h2\n  bind 127.0.0.1:{}\n  http-request return status 200 content-type text/plain string ok\n",
                global(1),
                free_port(),
                t.direct
            ),
        );
        let ha_cfg = |threads: u32, http: u16, h2: u16, tcp: u16| {
            format!(
                "{}frontend fe\n  bind 127.0.0.1:{http}\n  bind 127.0.0.1:{h2} proto h2\n  default_backend be\nbackend be\n  http-reuse always\n  server o 127.0.0.1:{}\nlisten tcp\n  mode tcp\n  bind 127.0.0.1:{tcp}\n  server s 127.0.0.1:{}\n",
                global(threads),
                t.direct,
                t.sink
            )
        };
        let ha = haproxy(
            dir.path(),
            "proxy",
            PROXY_CORE,
            &ha_cfg(1, t.haproxy, t.haproxy_h2, t.haproxy_tcp),
        );
        let ha2_port = free_port();
        let ha2 = haproxy(
            dir.path(),
            "proxy2",
            "0,1",
            &ha_cfg(2, ha2_port, free_port(), free_port()),
        );
        let (min, min_http, min_tcp, _) =
            outrigger(dir.path(), &bin, t.direct, t.sink, true, 1, PROXY_CORE);
        let (def, def_http, _, _) =
            outrigger(dir.path(), &bin, t.direct, t.sink, false, 1, PROXY_CORE);
        let (def2, def2_http, _, _) =
            outrigger(dir.path(), &bin, t.direct, t.sink, false, 2, "0,1");
        for p in [
            t.direct, t.haproxy, t.haproxy_h2, t.haproxy_tcp, ha2_port, min_http, min_tcp,
            def_http, def2_http,
        ] {
            wait_port(p).await;
        }
        // A second build to compare against, in the same run (`OUTRIGGER_BASELINE_BIN`).
        let baseline = std::env::var("OUTRIGGER_BASELINE_BIN").ok().map(|b| {
            outrigger(dir.path(), Path::new(&b), t.direct, t.sink, false, 1, PROXY_CORE)
        });
        if let Some((_, port, _, _)) = &baseline {
            wait_port(*port).await;
        }
        for (name, p) in [("haproxy", &ha), ("haproxy nbthread 2", &ha2), ("outrigger", &min)]
            .into_iter()
            .chain([("outrigger+resilience", &def), ("outrigger --workers 2", &def2)])
            .chain(baseline.iter().map(|(p, ..)| ("baseline+resilience", p)))
        {
            p.check_running(name);
        }
        let mut rows: Vec<(&str, u16, Option<&Proc>)> = vec![
            ("direct", t.direct, None),
            ("haproxy", t.haproxy, Some(&ha)),
            ("outrigger", min_http, Some(&min)),
            ("outrigger+resilience", def_http, Some(&def)),
        ];
        if let Some((p, port, _, _)) = &baseline {
            rows.push(("baseline+resilience", *port, Some(p)));
        }
        println!("rounds: {rounds}, each going over every target in turn; every figure is the median. Proxies on core {PROXY_CORE} (HAProxy nbthread 1, Outrigger --workers 1); origin and load on core {LOAD_CORE}.\n");
        // Rounds go over the targets in turn, so that a slow spell of a shared machine weighs
        // on every target rather than on one.
        // Resident memory before any load.
        let idle: Vec<f64> = rows.iter().map(|r| r.2.map_or(0.0, Proc::rss_mb)).collect();
        let mut per_round: Vec<Vec<Figures>> = vec![Vec::new(); rows.len()];
        for _ in 0..rounds {
            for (i, (_, port, proc_)) in rows.iter().enumerate() {
                per_round[i].push(round(*port, *proc_).await);
            }
        }
        println!("| target | sat. req/s (64 conns) | CPU µs/req at 2k/s | at 5k/s | at saturation | p50 / p99 / p99.9 ms at 2k/s | p50 / p99 / p99.9 ms at 5k/s | syscalls/req | ctx switches/req | RSS idle MB |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let mut of = std::collections::HashMap::new();
        for (((name, port, proc_), rounds), &idle_rss) in rows.iter().zip(&per_round).zip(&idle) {
            let (name, port, proc_) = (*name, *port, *proc_);
            let mut f = summarize(rounds, port, proc_).await;
            f.rss_idle = idle_rss;
            let dash = |v: String| if proc_.is_some() { v } else { "-".into() };
            println!(
                "| {name} | {:.0} | {} | {} | {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {} | {} |",
                f.sat,
                dash(format!("{:.1}", f.cpu_2k)),
                dash(format!("{:.1}", f.cpu_5k)),
                dash(format!("{:.1}", f.cpu_sat)),
                f.p50_2k,
                f.p99_2k,
                f.p999_2k,
                f.p50_5k,
                f.p99_5k,
                f.p999_5k,
                dash(f.syscalls.map_or("n/a".into(), |c| format!("{c:.2}"))),
                dash(format!("{:.2}", f.switches)),
                dash(format!("{idle_rss:.1}")),
            );
            of.insert(name, f);
        }
        // Two cores: the same proxies with two threads each, saturated (the load generator shares
        // the cores, so this is the scaling a busy two-core host sees).
        let sat2 = |port| median((0..rounds).map(|_| wrk(port, 5)).collect());
        let (ha2_sat, or2_sat) = (sat2(ha2_port), sat2(def2_http));
        println!("\n| two cores (cores 0-1, shared with the load) | sat. req/s | × its one-core figure |\n|---|---|---|");
        println!("| haproxy nbthread 2 | {ha2_sat:.0} | {:.2} |", ha2_sat / of["haproxy"].sat.max(1.0));
        println!(
            "| outrigger+resilience --workers 2 | {or2_sat:.0} | {:.2} |",
            or2_sat / of["outrigger+resilience"].sat.max(1.0)
        );
        drop((ha2, def2));
        // Idle keep-alive connections.
        let mut idle_rows = Vec::new();
        let mut kb_of = std::collections::HashMap::new();
        for (name, port, p) in [
            ("haproxy", t.haproxy, &ha),
            ("outrigger+resilience", def_http, &def),
        ] {
            let before = p.rss_mb();
            let conns = idle_connections(port, 5_000).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = p.rss_mb();
            let kb = (after - before) * 1024.0 / conns.len().max(1) as f64;
            idle_rows.push(format!(
                "| {name} | {} | {before:.1} | {after:.1} | {kb:.1} |",
                conns.len(),
            ));
            kb_of.insert(name, kb);
            drop(conns);
        }
        println!("\n| idle keep-alive | connections | RSS before MB | RSS after MB | KB per connection |");
        println!("|---|---|---|---|---|");
        for r in &idle_rows {
            println!("{r}");
        }
        // HTTP/2 and TCP.
        let h2_ha = median((0..rounds).map(|_| h2load(t.haproxy_h2)).collect());
        let h2_or = median((0..rounds).map(|_| h2load(def_http)).collect());
        let mut bulk_rows = Vec::new();
        for (name, port) in [("direct", t.sink), ("haproxy", t.haproxy_tcp), ("outrigger", min_tcp)] {
            let mut v = Vec::new();
            for _ in 0..rounds {
                v.push(bulk(port, 1024).await);
            }
            bulk_rows.push((name, median(v)));
        }
        println!("\n| h2load (4 conns x 32 streams) | req/s |\n|---|---|\n| haproxy | {h2_ha:.0} |\n| outrigger+resilience | {h2_or:.0} |");
        println!("\n| TCP bulk (1 GiB) | MB/s |\n|---|---|");
        for (n, v) in &bulk_rows {
            println!("| {n} | {v:.0} |");
        }
        println!();
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let (ha, direct) = (&of["haproxy"], &of["direct"]);
        for o in ["outrigger", "outrigger+resilience", "baseline+resilience"] {
            let Some(f) = of.get(o) else { continue };
            println!("ratio cpu_per_req_2k {o}/haproxy {:.2}", ratio(f.cpu_2k, ha.cpu_2k));
            println!("ratio cpu_per_req_5k {o}/haproxy {:.2}", ratio(f.cpu_5k, ha.cpu_5k));
            println!("ratio cpu_per_req_sat {o}/haproxy {:.2}", ratio(f.cpu_sat, ha.cpu_sat));
            println!("ratio saturation {o}/haproxy {:.2}", ratio(f.sat, ha.sat));
            println!(
                "ratio added_p50_2k {o}/haproxy {:.2}",
                ratio(f.p50_2k - direct.p50_2k, ha.p50_2k - direct.p50_2k)
            );
            println!(
                "ratio added_p50_5k {o}/haproxy {:.2}",
                ratio(f.p50_5k - direct.p50_5k, ha.p50_5k - direct.p50_5k)
            );
        }
        println!(
            "ratio two_workers outrigger+resilience/one_worker {:.2}",
            ratio(or2_sat, of["outrigger+resilience"].sat)
        );
        println!("ratio h2_throughput outrigger+resilience/haproxy {:.2}", ratio(h2_or, h2_ha));
        println!(
            "figure idle_kb_per_connection outrigger+resilience {:.1} haproxy {:.1}",
            kb_of["outrigger+resilience"], kb_of["haproxy"]
        );
        println!(
            "figure idle_rss_mb outrigger+resilience {:.1}",
            of["outrigger+resilience"].rss_idle
        );
        println!(
            "ratio tcp_bulk outrigger/direct {:.2}",
            ratio(bulk_rows[2].1, bulk_rows[0].1)
        );
    });
}
