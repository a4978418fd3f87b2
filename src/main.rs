//! The `outrigger` command: `run` the proxy, `check` or `explain` a config file, or `probe` a
//! running proxy.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use outrigger::app::App;
use outrigger::control::config::{self, Loaded};
use outrigger::proxy::workers::Workers;
use outrigger::rng::Rng;
use outrigger::telemetry::logging::{self, LogFormat};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "outrigger",
    version,
    about = "A service-mesh sidecar proxy focused on resiliency"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config when no file is given).
    Run {
        /// Config file; watched and reloaded on change and on SIGHUP.
        #[arg(long, short, env = "OUTRIGGER_CONFIG")]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Threads serving connections, each on its own socket per listener; one per core when
        /// absent. Set it to the cores the sidecar is given.
        #[arg(long, env = "OUTRIGGER_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Validate a config file without starting anything.
    Check {
        /// Config file to check.
        #[arg(long, short, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
    },
    /// A show of about 30 seconds that needs nothing else: misbehaving in-process services
    /// behind a proxy with every policy off and one with the defaults, side by side.
    Demo {
        /// How long the load runs.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Show what every route does once defaults apply, the worst-case latency and load
    /// amplification that follow, and warnings for known traps.
    Explain {
        /// Config file to explain (the embedded default when absent).
        #[arg(long, short, env = "OUTRIGGER_CONFIG")]
        config: Option<PathBuf>,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// Ask a running proxy's admin server whether it is ready: exit 0 on 200, 1 otherwise. The
    /// container health check, for images with no shell or curl.
    Probe {
        /// Config file the proxy runs on, read for its admin address (the embedded default
        /// when absent).
        #[arg(long, short, env = "OUTRIGGER_CONFIG")]
        config: Option<PathBuf>,
        /// Admin address to ask instead of the config's.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Admin path to ask.
        #[arg(long, default_value = "/ready")]
        path: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// How `explain` prints its report.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExplainFormat {
    /// For a terminal.
    Text,
    /// For programs: see config/explain.schema.json.
    Json,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => check(&config),
        Command::Demo { duration } => {
            let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(outrigger::demo::run(duration)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrigger demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain {
            config,
            route,
            format,
        } => explain(config.as_deref(), route.as_deref(), format),
        Command::Probe {
            config,
            admin,
            path,
            timeout,
        } => probe(config.as_deref(), admin, &path, timeout),
        Command::Run {
            config,
            log_format,
            workers,
        } => {
            let tuned = tune_allocator();
            logging::init(log_format);
            if let Err(e) = tuned {
                tracing::debug!(error = %e, "running with glibc's default per-thread cache");
            }
            // The control side (admin, discovery, health checks, the Raft group) runs here;
            // connections are served on the workers' threads.
            let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            let n = workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, usize::from),
                usize::from,
            );
            let workers = match Workers::start(n) {
                Ok(w) => Arc::new(w),
                Err(e) => {
                    eprintln!("outrigger: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = runtime.block_on(run(config, workers.clone()));
            workers.stop();
            code
        }
    }
}

/// What the proxy asks of glibc's allocator through `GLIBC_TUNABLES`: a per-thread cache of
/// up to 256 freed blocks of each small size instead of 7. A worker with a few dozen requests
/// in flight frees more blocks of a size than 7 before it allocates one again, and every block
/// past the seventh went through the arena's bins (about 1,350 instructions per request, 5%,
/// with 64 requests in flight); the cache holds no more than what was live at once anyway.
const TUNABLES: &str = "glibc.malloc.tcache_count=256";

/// Runs this program again, in place, with [`TUNABLES`] in its environment, which glibc reads
/// only when a program starts. It returns (the program goes on untuned) when `GLIBC_TUNABLES`
/// is already set, by an operator or by the run before, or when the program cannot be run
/// again. Called before any thread starts.
fn tune_allocator() -> std::io::Result<()> {
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(std::env::current_exe()?);
    if let Some(arg0) = args.next() {
        again.arg0(arg0);
    }
    // `exec` only returns on failure.
    Err(again.args(args).env("GLIBC_TUNABLES", TUNABLES).exec())
}

/// The runtime `builder` makes, with every driver on; `None` (said on stderr) if it cannot start.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("outrigger: cannot start the runtime: {e}");
            None
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load_file(path) {
        Ok(loaded) => {
            let c = &loaded.config;
            let routes: usize = c
                .listeners
                .iter()
                .map(|l| match &l.kind {
                    config::ListenerKind::Http { routes } => routes.len(),
                    config::ListenerKind::Tcp { .. } => 0,
                })
                .sum();
            println!(
                "ok: {} listeners, {} routes, {} clusters",
                c.listeners.len(),
                routes,
                c.clusters.len()
            );
            if let Some(m) = &c.mesh {
                if m.role != config::mesh::Role::Client {
                    // A reload cannot move a member's identity or its store: say so up front.
                    println!(
                        "note: mesh.node_id, data_dir, role, listen, members and timings take effect at start; a running sidecar keeps its config and logs an error on a reload that changes them: restart it instead"
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for d in &errors.0 {
                println!("{d}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The config file at `path`, or the embedded default without one.
fn load(path: Option<&std::path::Path>) -> Result<Loaded, config::ConfigErrors> {
    match path {
        Some(p) => config::load_file(p),
        None => config::load_embedded(),
    }
}

fn explain(path: Option<&std::path::Path>, route: Option<&str>, format: ExplainFormat) -> ExitCode {
    let loaded = match load(path) {
        Ok(l) => l,
        Err(errors) => {
            for d in &errors.0 {
                println!("{d}");
            }
            return ExitCode::FAILURE;
        }
    };
    let report = config::explain::explain(&loaded.config, route);
    if let Some(name) = route {
        if report.routes.is_empty() {
            println!("no HTTP route is named `{name}`");
            return ExitCode::FAILURE;
        }
    }
    match format {
        ExplainFormat::Text => print!("{}", report.text()),
        ExplainFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                println!("explain: {e}");
                return ExitCode::FAILURE;
            }
        },
    }
    ExitCode::SUCCESS
}

fn probe(
    config: Option<&std::path::Path>,
    admin: Option<SocketAddr>,
    path: &str,
    timeout: Duration,
) -> ExitCode {
    let admin = match admin {
        Some(a) => a,
        None => match load(config) {
            Ok(l) => l.config.admin_address,
            Err(errors) => {
                for d in &errors.0 {
                    println!("{d}");
                }
                println!("probe: cannot read the admin address; pass --admin");
                return ExitCode::FAILURE;
            }
        },
    };
    // A wildcard admin address is reached on the loopback of its family.
    let target = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port())
        }
        _ => admin,
    };
    match ask(target, path, timeout) {
        Ok(status) if status.split(' ').nth(1) == Some("200") => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("probe: http://{target}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status line of `GET path` at `target`, over one HTTP/1.1 connection.
fn ask(target: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n"
    )?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // The status line only: the body is not needed.
    while !head.ends_with(b"\r\n") && head.len() < 1024 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head).trim_end().to_owned();
    if line.starts_with("HTTP/") {
        Ok(line)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {line:?}"),
        ))
    }
}

async fn run(path: Option<PathBuf>, workers: Arc<Workers>) -> ExitCode {
    let loaded = match load(path.as_deref()) {
        Ok(l) => l,
        Err(errors) => {
            for d in &errors.0 {
                tracing::error!("{d}");
            }
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(file = %loaded.file, hash = %loaded.hash, "config loaded");
    // Before anything is announced: a signal sent as soon as "outrigger started" is logged must
    // find its handler (the default action would kill the process without a drain), and one
    // sent during start is acted on once the proxy runs.
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        workers = workers.count(),
        "serving on one thread per worker"
    );
    let app = match App::start_on(loaded, path, Rng::from_entropy(), workers).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(admin = %app.admin_addr(), "outrigger started");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                app.reload(true).await;
            }
        }
    }
    let drained = app.shutdown().await;
    tracing::info!(drained, "outrigger stopped");
    ExitCode::SUCCESS
}
