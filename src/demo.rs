//! `outrigger demo`: a self-contained show of what the resilience layers save. It starts three
//! in-process instances of a service that misbehave the way real ones do (one fails a quarter of
//! its requests, one has a slow tail, one crashes a third of the way in), puts two proxies in
//! front of them (one with every policy off, one with the defaults plus a per-try timeout) and
//! sends both the same load, printing a live table and then a summary.

use std::convert::Infallible;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::control::config;
use crate::rng::Rng;

/// Requests per second each proxy is offered.
const RATE: u32 = 200;
/// Share of the flaky instance's requests that fail with 503.
const FLAKY_FAILURES: f64 = 0.25;
/// Share of the slow instance's requests that take `SLOW_TAIL`.
const SLOW_SHARE: f64 = 0.10;
/// The slow instance's tail latency: longer than a caller waits.
const SLOW_TAIL: Duration = Duration::from_millis(2500);
/// How long the load waits for an answer before counting a failure (a caller's own timeout).
const CALLER_TIMEOUT: Duration = Duration::from_secs(2);

/// How one instance of the demo service misbehaves.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// A share of requests fail with 503.
    Flaky,
    /// A share of requests are slow.
    SlowTail,
    /// Healthy until it crashes: its port then refuses connections.
    Crashes,
}

/// Starts one instance; `crash` ends its listener (and every connection) when cancelled.
async fn instance(
    kind: Misbehaviour,
    rng: Rng,
    crash: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                () = crash.cancelled() => return,
            };
            let (rng, crash) = (rng.fork(), crash.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let rng = rng.fork();
                    async move {
                        let status = match kind {
                            Misbehaviour::Flaky if rng.f64() < FLAKY_FAILURES => {
                                StatusCode::SERVICE_UNAVAILABLE
                            }
                            Misbehaviour::SlowTail if rng.f64() < SLOW_SHARE => {
                                tokio::time::sleep(SLOW_TAIL).await;
                                StatusCode::OK
                            }
                            _ => StatusCode::OK,
                        };
                        let mut r = Response::new(Full::new(Bytes::from_static(b"catalog\n")));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    () = crash.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// What one proxy's callers saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    /// Latencies of every answer, microseconds.
    latencies: Vec<u32>,
}

impl Tally {
    fn success(&self) -> f64 {
        if self.sent == 0 {
            return 100.0;
        }
        self.ok as f64 * 100.0 / self.sent as f64
    }

    fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort_unstable();
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latencies.len()) - 1;
        Duration::from_micros(u64::from(self.latencies[i]))
    }
}

/// One proxy under load: its app, its listener, and the tallies of the current second and of
/// the whole run.
struct Side {
    name: &'static str,
    app: App,
    url: String,
    second: Mutex<Tally>,
    total: Mutex<Tally>,
}

fn config_text(endpoints: &str, resilient: bool) -> String {
    let policy = if resilient {
        // The defaults (3 tries on connect failures and gateway errors, budget, breaker, outlier
        // ejection) plus a per-try timeout that cuts the slow tail and retries it elsewhere.
        "        timeout: 1500ms\n        retry: { attempts: 3, per_try_timeout: 250ms, retry_on: [connect-failure, refused-stream, reset, gateway-error, timeout] }\n"
    } else {
        "        timeout: 0s\n        retry: { attempts: 1 }\n"
    };
    let cluster = if resilient {
        ""
    } else {
        "    circuit_breaker: { enabled: false }\n    outlier_detection: { enabled: false }\n"
    };
    format!(
        "admin:\n  address: 127.0.0.1:0\nlisteners:\n  - name: demo\n    address: 127.0.0.1:0\n    routes:\n      - name: catalog\n        cluster: catalog\n{policy}clusters:\n  - name: catalog\n    endpoints: [{endpoints}]\n    load_balancer: round_robin\n{cluster}"
    )
}

/// A latency in milliseconds, with a decimal below 10 ms.
fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

/// The sum of a counter family in a scrape.
fn counter(scrape: &str, family: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the demo for `duration`, writing to stdout.
pub async fn run(duration: Duration) -> Result<(), String> {
    let colour = std::io::stdout().is_terminal();
    let paint = |code: &str, text: String| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    let rng = Rng::from_entropy();
    let crash = CancellationToken::new();
    let never = CancellationToken::new();
    let mut endpoints = Vec::new();
    for (kind, token) in [
        (Misbehaviour::Flaky, &never),
        (Misbehaviour::SlowTail, &never),
        (Misbehaviour::Crashes, &crash),
    ] {
        let addr = instance(kind, rng.fork(), token.clone())
            .await
            .map_err(|e| format!("cannot start the demo service: {e}"))?;
        endpoints.push(addr.to_string());
    }
    let endpoints = endpoints.join(", ");
    let mut sides = Vec::new();
    for (name, resilient) in [("policies off", false), ("outrigger defaults", true)] {
        let loaded =
            config::parse(name, &config_text(&endpoints, resilient)).map_err(|e| e.to_string())?;
        let app = App::start_with(loaded, None, rng.fork())
            .await
            .map_err(|e| format!("cannot start the {name} proxy: {e}"))?;
        let addr = app
            .listener_addr("demo")
            .ok_or("the demo listener did not bind")?;
        sides.push(Arc::new(Side {
            name,
            app,
            url: format!("http://{addr}/catalog"),
            second: Mutex::default(),
            total: Mutex::default(),
        }));
    }
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{}\n  three instances of `catalog` behind round robin: one fails {:.0}% of requests with 503, one answers {:.0}% after {} ms, one crashes at {} s\n  {} requests/s to each proxy for {} s; a caller gives up after {} s\n  injected: {:.1}% of requests fail, {:.1}% outlast the caller, and a third go to an instance that is gone after {} s\n",
        paint("1", "Outrigger demo".into()),
        FLAKY_FAILURES * 100.0,
        SLOW_SHARE * 100.0,
        SLOW_TAIL.as_millis(),
        (duration / 3).as_secs(),
        RATE,
        duration.as_secs(),
        CALLER_TIMEOUT.as_secs(),
        FLAKY_FAILURES * 100.0 / 3.0,
        SLOW_SHARE * 100.0 / 3.0,
        (duration / 3).as_secs()
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>28}  {:>48}",
        "", "policies off", "outrigger defaults"
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>8} {:>9} {:>9}  {:>8} {:>9} {:>9} {:>8} {:>10}",
        "s", "success", "p50", "p99", "success", "p50", "p99", "retries", "breaker"
    );
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // The load: RATE requests per second to each side, each on its own task.
    let load = {
        let (sides, client, stop) = (sides.clone(), client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for side in &sides {
                    let (side, client) = (side.clone(), client.clone());
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let req = Request::get(&side.url).body(Empty::new());
                        let ok = match req {
                            Ok(req) => matches!(
                                tokio::time::timeout(CALLER_TIMEOUT, async {
                                    let resp = client.request(req).await.ok()?;
                                    let status = resp.status();
                                    resp.into_body().collect().await.ok()?;
                                    Some(status)
                                })
                                .await,
                                Ok(Some(StatusCode::OK))
                            ),
                            Err(_) => false,
                        };
                        let micros = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        for tally in [&side.second, &side.total] {
                            if let Ok(mut t) = tally.lock() {
                                t.sent += 1;
                                t.ok += u64::from(ok);
                                t.latencies.push(micros);
                            }
                        }
                    });
                }
            }
        })
    };
    let mut second =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut crashed = false;
    // One row a second, whole seconds only.
    for elapsed in 1..=duration.as_secs().max(1) {
        second.tick().await;
        if !crashed && Instant::now() >= start + duration / 3 {
            crash.cancel();
            crashed = true;
            let _ = writeln!(out, "{}", paint("33", "       one instance crashed".into()));
        }
        let mut cells = Vec::new();
        for side in &sides {
            let mut t = side
                .second
                .lock()
                .map(|mut t| std::mem::take(&mut *t))
                .unwrap_or_default();
            let success = t.success();
            let text = format!("{success:>7.1}%");
            let cell = if success >= 99.0 {
                paint("32", text)
            } else if success >= 90.0 {
                paint("33", text)
            } else {
                paint("31", text)
            };
            let (p50, p99) = (t.percentile(50.0), t.percentile(99.0));
            cells.push(format!("{cell} {:>9} {:>9}", millis(p50), millis(p99)));
        }
        let (retries, breaker) = extras(&client, &sides[1].app).await;
        let _ = writeln!(
            out,
            "{elapsed:>4}  {}  {} {retries:>8.0} {breaker:>10}",
            cells[0], cells[1]
        );
        let _ = out.flush();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    // Requests still in flight finish (or give up) within the caller's timeout.
    tokio::time::sleep(CALLER_TIMEOUT).await;
    let mut totals = Vec::new();
    for side in &sides {
        let t = side
            .total
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        totals.push(t);
    }
    let (retries, breaker) = extras(&client, &sides[1].app).await;
    let _ = writeln!(out, "\n{}", paint("1", "Summary".into()));
    for (side, t) in sides.iter().zip(totals.iter_mut()) {
        let (p50, p99) = (t.percentile(50.0), t.percentile(99.0));
        let _ = writeln!(
            out,
            "  {:<19} success {:>6.2}% ({} of {}), p50 {}, p99 {}",
            format!("{}:", side.name),
            t.success(),
            t.ok,
            t.sent,
            millis(p50),
            millis(p99)
        );
    }
    let failed = |t: &Tally| t.sent - t.ok;
    let saved = failed(&totals[0]).saturating_sub(failed(&totals[1]));
    let _ = writeln!(
        out,
        "  the resilience layers turned {} failed requests into {} ({} saved), with {:.0} retries (the budget allows 20% + 10/s); breaker now {breaker}",
        failed(&totals[0]),
        failed(&totals[1]),
        saved,
        retries
    );
    let _ = writeln!(
        out,
        "  see `outrigger explain` for the policy in force on each route"
    );
    for side in sides {
        side.app.shutdown().await;
    }
    Ok(())
}

/// The resilient side's retries so far and its cluster's breaker state.
async fn extras(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    app: &App,
) -> (f64, String) {
    let admin = app.admin_addr();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{admin}{path}"))
                .body(Empty::new())
                .ok()?;
            let resp = client.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some(String::from_utf8_lossy(&body).into_owned())
        }
    };
    let retries = get("/metrics")
        .await
        .map_or(0.0, |m| counter(&m, "outrigger_retries_total"));
    let breaker = get("/clusters")
        .await
        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
        .and_then(|v| v["clusters"][0]["circuit"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    (retries, breaker)
}
