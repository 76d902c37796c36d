//! Load benchmark: llm-meter against a fast mock upstream, each in its own process on loopback,
//! direct and proxied rounds alternated, medians reported.
//!
//! `cargo bench --bench proxy` runs every scenario; `-- --rounds 5 --seconds 3 --soak 60` tunes it,
//! `-- --help` lists the options.

// The benchmark's own servers and load driver run until the process ends: detached
// connection tasks are what they are made of.
#![expect(
    clippy::disallowed_methods,
    reason = "benchmark processes own no graceful shutdown"
)]

mod floor;
mod load;
mod mock;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use load::{Measure, Mode, Round, Shape};

struct Options {
    rounds: usize,
    seconds: f64,
    soak_seconds: u64,
    only: Option<Vec<String>>,
    tls: bool,
}

const USAGE: &str = "\
usage: cargo bench --bench proxy [-- OPTIONS]

  --rounds N      rounds per target and scenario, medians reported (default 3)
  --seconds S     length of a round in seconds (default 2)
  --soak S        then S seconds of S1 against llm-meter alone, RSS sampled (default 0: none)
  --only LIST     only these scenarios (S1-S7), e.g. S4,S5,S6
  --tls           llm-meter's upstream is the mock behind TLS (a CA made for the run), offering
                  HTTP/2 and HTTP/1.1; the fourth target is this build with http2 = false
                  (direct and floor stay plain HTTP): HTTP/2 against HTTP/1.1 in one run

With BENCH_BASELINE=PATH, the fourth target is the llm-meter binary at PATH (another build, with
its ledger on) instead of this build with --no-persist: a before/after comparison in one run.
With BENCH_LEDGER_URL=postgres://…, it is this build with its ledger in that PostgreSQL database
(a scratch one: rows are added to it): the PostgreSQL ledger against the SQLite one.
";

/// Reads the options; a flag it does not know or a value it cannot read ends the run with the
/// usage, so that a typo never runs the whole benchmark with defaults.
fn options() -> Options {
    let mut options = Options {
        rounds: 3,
        seconds: 2.0,
        soak_seconds: 0,
        only: None,
        tls: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage_error(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            // cargo passes it to every bench target.
            "--bench" => {}
            "--rounds" => options.rounds = parse(&flag, &value()),
            "--tls" => options.tls = true,
            "--seconds" => options.seconds = parse(&flag, &value()),
            "--soak" => options.soak_seconds = parse(&flag, &value()),
            "--only" => {
                let known: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
                let only: Vec<String> = value()
                    .split(',')
                    .map(|n| n.trim().to_ascii_uppercase())
                    .collect();
                if let Some(unknown) = only.iter().find(|n| !known.contains(&n.as_str())) {
                    usage_error(&format!(
                        "no scenario {unknown} (there are {})",
                        known.join(", ")
                    ));
                }
                options.only = Some(only);
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => usage_error(&format!("unknown option {flag}")),
        }
    }
    if options.rounds == 0 || !options.seconds.is_finite() || options.seconds <= 0.0 {
        usage_error("--rounds and --seconds must be above 0");
    }
    options
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| usage_error(&format!("{flag}: cannot read {value:?}")))
}

fn usage_error(problem: &str) -> ! {
    eprint!("proxy bench: {problem}\n\n{USAGE}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--mock") {
        return serve_child(mock::serve);
    }
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--mock-tls")
        .and_then(|i| args.get(i + 1))
    {
        let tls = mock::tls_acceptor(std::path::Path::new(dir));
        return serve_child(move |listener| mock::serve_tls(listener, tls));
    }
    if let Some(upstream) = args
        .iter()
        .position(|a| a == "--floor")
        .and_then(|i| args.get(i + 1))
    {
        let upstream: SocketAddr = upstream
            .parse()
            .expect("--floor takes the upstream address");
        return serve_child(move |listener| floor::serve(listener, upstream));
    }
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(orchestrate(&options));
}

/// Runs a server of the benchmark's own (mock or floor) in this child process.
fn serve_child<F: std::future::Future<Output = ()>>(
    server: impl FnOnce(tokio::net::TcpListener) -> F,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        server(listener).await;
    });
}

/// A child process that is killed when dropped.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut command: Command, parse: impl Fn(&str) -> Option<SocketAddr>) -> Process {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("startup line");
    let addr = parse(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
    Process { child, addr }
}

fn start_child(args: &[&str]) -> Process {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command.args(args);
    spawn(command, |line| line.trim().parse().ok())
}

/// Builds the proxy exactly as users do (`cargo build --release`), in a target folder of its own:
/// the copy cargo builds for benchmarks carries dev-dependency features (tokio's test clock among
/// them) that a user's build does not have.
fn build_proxy() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("bench-proxy");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--bin",
            "llm-meter",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the proxy failed");
    target.join("release").join("llm-meter")
}

/// Starts llm-meter forwarding to `upstream` (a base URL) with `config` (proxy.toml's text);
/// `data_dir` holds its ledger, `None` runs it with `--no-persist`.
fn start_proxy(
    binary: &std::path::Path,
    upstream: &str,
    config: &str,
    data_dir: Option<&std::path::Path>,
) -> Process {
    let file = tempfile::NamedTempFile::new().expect("a config file");
    std::fs::write(file.path(), config).expect("the config written");
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
        .arg("--config")
        .arg(file.path());
    match data_dir {
        Some(dir) => command.arg("--data-dir").arg(dir),
        None => command.arg("--no-persist"),
    };
    command
        .args(
            std::env::var("BENCH_PROXY_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .current_dir(std::env::temp_dir())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
    // The file is read at start, before the start-up line `spawn` waits for.
    spawn(command, |line| {
        line.split("http://")
            .nth(1)?
            .split(',')
            .next()?
            .parse()
            .ok()
    })
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time of each thread of a process so far, by thread name.
fn thread_cpu(pid: u32) -> Vec<(String, Duration)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(String, Duration)> = tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            Some((
                name.trim().to_owned(),
                stat_cpu(&dir.join("stat").display().to_string()),
            ))
        })
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    threads
}

fn stat_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `/proc/PID/status` memory figure (`VmRSS`, `VmHWM`) in MB.
fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak RSS (`VmHWM`) so each scenario reports its own.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

struct Scenario {
    name: &'static str,
    what: &'static str,
    shape: Shape,
    mode: Mode,
    measure: Measure,
}

/// A chat request of about `body_bytes` whose prompt starts with `lead`.
fn chat_body(lead: &str, body_bytes: usize, stream: bool) -> Bytes {
    let skeleton = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"{lead}"}}]}}"#
    );
    let filler = "lorem ipsum dolor sit amet ".repeat(body_bytes / 27 + 1);
    let content = &filler[..body_bytes.saturating_sub(skeleton.len())];
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"{lead}{content}"}}]}}"#
    ))
}

fn scenarios() -> Vec<Scenario> {
    let small = Shape {
        body: chat_body("", 300, false),
        is_stream: false,
    };
    let large = Shape {
        body: chat_body("", 100 * 1024, false),
        is_stream: false,
    };
    let stream = Shape {
        body: chat_body("", 300, true),
        is_stream: true,
    };
    let closed = Mode::Closed { concurrency: 16 };
    vec![
        Scenario {
            name: "S1",
            what: "small body (~300 B), c=16",
            shape: small.clone(),
            mode: closed,
            measure: Measure::Total,
        },
        Scenario {
            name: "S2",
            what: "100 KB prompt body, c=16",
            shape: large,
            mode: closed,
            measure: Measure::Total,
        },
        Scenario {
            name: "S3",
            what: "stream of 20 chunks, c=16",
            shape: stream.clone(),
            mode: closed,
            measure: Measure::Total,
        },
        Scenario {
            name: "S4",
            what: "fixed 200 req/s",
            shape: small.clone(),
            mode: Mode::Rate { per_second: 200 },
            measure: Measure::Total,
        },
        Scenario {
            name: "S5",
            what: "fixed 20 req/s",
            shape: small,
            mode: Mode::Rate { per_second: 20 },
            measure: Measure::Total,
        },
        Scenario {
            name: "S6",
            what: "stream at 20 req/s, first byte",
            shape: stream,
            mode: Mode::Rate { per_second: 20 },
            measure: Measure::FirstByte,
        },
        Scenario {
            name: "S7",
            what: "stream, events 1 ms apart, at 20 req/s, last byte",
            shape: Shape {
                body: chat_body(&format!("{} ", mock::TRICKLE_MARK), 300, true),
                is_stream: true,
            },
            mode: Mode::Rate { per_second: 20 },
            measure: Measure::Total,
        },
    ]
}

/// The medians over rounds, for one target.
#[derive(Default)]
struct Summary {
    per_second: f64,
    p50: f64,
    #[allow(dead_code, reason = "kept for ad-hoc printing")]
    p90: f64,
    p99: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summarize(rounds: &[Round]) -> Summary {
    Summary {
        per_second: median(rounds.iter().map(Round::per_second).collect()),
        p50: median(rounds.iter().map(|r| r.percentile_ms(50.0)).collect()),
        p90: median(rounds.iter().map(|r| r.percentile_ms(90.0)).collect()),
        p99: median(rounds.iter().map(|r| r.percentile_ms(99.0)).collect()),
    }
}

/// What one target did in one scenario, medians over rounds.
struct Measured {
    summary: Summary,
    cpu_per_request_ms: f64,
}

/// One round against one target.
async fn measure(
    target: &Process,
    scenario: &Scenario,
    duration: Duration,
    rounds: &mut Vec<Round>,
    cpu: &mut (Duration, u64),
) {
    let before = cpu_time(target.pid());
    let round = load::round(
        target.addr,
        &scenario.shape,
        scenario.mode,
        scenario.measure,
        duration,
    )
    .await;
    account(target, scenario, round, before, rounds, cpu);
}

/// One fixed-rate round against every target at once, their requests taking turns.
async fn measure_together(
    targets: &[&Process; 4],
    scenario: &Scenario,
    per_second: u32,
    duration: Duration,
    rounds: &mut [Vec<Round>; 4],
    cpu: &mut [(Duration, u64); 4],
) {
    let before = targets.map(|target| cpu_time(target.pid()));
    let addrs = targets.map(|target| target.addr);
    let measured = load::interleaved(
        &addrs,
        &scenario.shape,
        per_second,
        scenario.measure,
        duration,
    )
    .await;
    for (t, round) in measured.into_iter().enumerate() {
        account(
            targets[t],
            scenario,
            round,
            before[t],
            &mut rounds[t],
            &mut cpu[t],
        );
    }
}

/// Checks a round's answers and adds it, and the CPU its target spent since `before`.
fn account(
    target: &Process,
    scenario: &Scenario,
    round: Round,
    before: Duration,
    rounds: &mut Vec<Round>,
    cpu: &mut (Duration, u64),
) {
    cpu.0 += cpu_time(target.pid()) - before;
    cpu.1 += round.ok;
    assert_eq!(
        round.failed, 0,
        "{}: {} wrong answers",
        scenario.name, round.failed
    );
    rounds.push(round);
}

fn measured(rounds: &[Round], cpu: (Duration, u64)) -> Measured {
    Measured {
        summary: summarize(rounds),
        cpu_per_request_ms: cpu.0.as_secs_f64() * 1000.0 / cpu.1.max(1) as f64,
    }
}

async fn orchestrate(options: &Options) {
    let binary = build_proxy();
    let mock = start_child(&["--mock"]);
    let floor = start_child(&["--floor", &mock.addr.to_string()]);
    let data = tempfile::tempdir().expect("a temporary data directory");
    // With --tls, llm-meter's upstream is the TLS mock, trusted through the CA it wrote.
    let tls_dir = tempfile::tempdir().expect("a directory for the test CA");
    let tls_mock = options
        .tls
        .then(|| start_child(&["--mock-tls", &tls_dir.path().display().to_string()]));
    let (upstream, config) = match &tls_mock {
        Some(tls) => (
            format!("https://localhost:{}/v1", tls.addr.port()),
            format!("ca_file = {:?}\n", tls_dir.path().join("ca.pem")),
        ),
        None => (format!("http://{}/v1", mock.addr), String::new()),
    };
    let proxy = start_proxy(&binary, &upstream, &config, Some(data.path()));
    // The fourth target: this build without its ledger, this build over HTTP/1.1 (--tls), or
    // another build to compare with.
    let baseline = std::env::var_os("BENCH_BASELINE").map(std::path::PathBuf::from);
    let baseline_data = tempfile::tempdir().expect("a temporary data directory");
    let (in_memory, fourth) = match (&baseline, options.tls) {
        (_, true) => {
            let http1 = format!("{config}[upstreams.openai]\nhttp2 = false\n");
            let fourth = start_proxy(&binary, &upstream, &http1, Some(baseline_data.path()));
            (fourth, "http2 = false")
        }
        (Some(other), false) => (
            start_proxy(other, &upstream, &config, Some(baseline_data.path())),
            "baseline",
        ),
        (None, false) => match std::env::var("BENCH_LEDGER_URL") {
            Ok(url) => (
                start_proxy(
                    &binary,
                    &upstream,
                    &format!("ledger_url = {url:?}\n{config}"),
                    Some(baseline_data.path()),
                ),
                "postgres ledger",
            ),
            Err(_) => (
                start_proxy(&binary, &upstream, &config, None),
                "--no-persist",
            ),
        },
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = memory_mb(proxy.pid(), "VmRSS");
    // Requests each llm-meter was sent, to check its /stats against.
    let mut checked = [0u64; 2];

    println!(
        "llm-meter load benchmark: {} rounds of {} s per target and scenario, medians",
        options.rounds, options.seconds
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model()
    );
    match &baseline {
        _ if options.tls => println!(
            "targets: direct to the mock; floor = bare hyper pass-through (no metering, no logs); llm-meter (this build, its upstream the mock behind TLS, HTTP/2 by ALPN); http2 = false (the same over HTTP/1.1); both with ledger and request logs on"
        ),
        Some(other) => println!(
            "targets: direct to the mock; floor = bare hyper pass-through (no metering, no logs); llm-meter (this build, ledger and request logs on); baseline = {} (ledger and request logs on)",
            other.display()
        ),
        None => println!(
            "targets: direct to the mock; floor = bare hyper pass-through (no metering, no logs); llm-meter (metering, ledger and request logs on); llm-meter --no-persist (no ledger)"
        ),
    }
    println!();
    println!(
        "| scenario | direct req/s | floor req/s (ratio) | llm-meter req/s (ratio) | {fourth} req/s (ratio) | llm-meter vs {fourth} | direct p50 / p99 ms | added p50 / p99 ms, floor | added p50 / p99 ms, llm-meter | CPU/req floor | CPU/req llm-meter | llm-meter peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let duration = Duration::from_secs_f64(options.seconds);
    for scenario in scenarios() {
        if options
            .only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|n| n == scenario.name))
        {
            continue;
        }
        // Warm every path (connections, caches, pools).
        let warm = Duration::from_millis(300);
        let targets = [&mock, &floor, &proxy, &in_memory];
        for (t, target) in targets.iter().enumerate() {
            let warmed = load::round(
                target.addr,
                &scenario.shape,
                scenario.mode,
                scenario.measure,
                warm,
            )
            .await;
            if t >= 2 {
                checked[t - 2] += warmed.ok + warmed.failed;
            }
        }
        let mut rounds: [Vec<Round>; 4] = Default::default();
        let mut cpu = [(Duration::ZERO, 0u64); 4];
        reset_peak(proxy.pid());
        for i in 0..options.rounds {
            match scenario.mode {
                // A fixed rate leaves the machine mostly idle: every target is measured in the
                // same seconds, so the VM's drift between rounds (larger here than the
                // differences measured) hits all alike.
                Mode::Rate { per_second } => {
                    measure_together(
                        &targets,
                        &scenario,
                        per_second,
                        duration,
                        &mut rounds,
                        &mut cpu,
                    )
                    .await;
                }
                // Saturating loads one target at a time, in a rotating order, so drift on a
                // shared machine hits every target alike.
                Mode::Closed { .. } => {
                    for k in 0..targets.len() {
                        let t = (i + k) % targets.len();
                        measure(targets[t], &scenario, duration, &mut rounds[t], &mut cpu[t]).await;
                    }
                }
            }
        }
        for (i, target) in [&proxy, &in_memory].into_iter().enumerate() {
            checked[i] += rounds[2 + i].iter().map(|r| r.ok).sum::<u64>();
            check_stats(target.addr, checked[i], scenario.name).await;
        }

        let [d, f, p, m] = [0, 1, 2, 3].map(|t| measured(&rounds[t], cpu[t]));
        let (d, f, p, m) = (&d.summary, &f, &p, &m);
        // Paired by round (measured back to back), then the median: the two llm-meter
        // processes differ by a few percent on a shared VM even when they do the same work.
        let paired = |f: &dyn Fn(&Round, &Round) -> f64| {
            median(
                rounds[2]
                    .iter()
                    .zip(&rounds[3])
                    .map(|(p, m)| f(p, m))
                    .collect(),
            )
        };
        let ledger_cost = match scenario.mode {
            Mode::Closed { .. } => format!(
                "{:+.1}%",
                (paired(&|p, m| p.per_second() / m.per_second()) - 1.0) * 100.0
            ),
            Mode::Rate { .. } => format!(
                "{:+.3} ms p50",
                paired(&|p, m| p.percentile_ms(50.0) - m.percentile_ms(50.0))
            ),
        };
        let peak = memory_mb(proxy.pid(), "VmHWM");
        let throughput = |m: &Measured| match scenario.mode {
            Mode::Closed { .. } => format!(
                "{:.0} ({:.2})",
                m.summary.per_second,
                m.summary.per_second / d.per_second
            ),
            Mode::Rate { .. } => format!("{:.0}", m.summary.per_second),
        };
        let added = |m: &Measured| {
            format!(
                "{:+.3} / {:+.3}",
                m.summary.p50 - d.p50,
                m.summary.p99 - d.p99
            )
        };
        println!(
            "| {} {} | {:.0} | {} | {} | {} | {} | {:.3} / {:.3} | {} | {} | {:.3} ms | {:.3} ms | {:.1} MB |",
            scenario.name,
            scenario.what,
            d.per_second,
            throughput(f),
            throughput(p),
            throughput(m),
            ledger_cost,
            d.p50,
            d.p99,
            added(f),
            added(p),
            f.cpu_per_request_ms,
            p.cpu_per_request_ms,
            peak
        );
    }
    println!();
    println!(
        "llm-meter RSS: {idle_rss:.1} MB idle at start, {:.1} MB idle after the load",
        memory_mb(proxy.pid(), "VmRSS")
    );
    println!(
        "checked: every answer (status 200, usage present, streams complete and unchanged) and /stats = {} requests (llm-meter), {} ({fourth})",
        checked[0], checked[1]
    );
    let stats = load::get_json(proxy.addr, "/stats").await;
    println!(
        "ledger: {} rows written, {} pending, {} lost; file {:.1} MB",
        stats["ledger"]["written_rows"],
        stats["ledger"]["pending_rows"],
        stats["ledger"]["lost_rows"],
        dir_mb(data.path())
    );
    for (i, (target, what)) in [(&proxy, "ledger"), (&in_memory, fourth)]
        .into_iter()
        .enumerate()
    {
        let threads: Vec<String> = thread_cpu(target.pid())
            .iter()
            .map(|(name, cpu)| {
                format!(
                    "{name} {:.2} µs",
                    cpu.as_secs_f64() * 1e6 / checked[i].max(1) as f64
                )
            })
            .collect();
        println!(
            "llm-meter ({what}) CPU per request by thread: {}",
            threads.join(", ")
        );
    }
    if options.soak_seconds > 0 {
        soak(&proxy, options.soak_seconds).await;
    }
}

async fn check_stats(proxy: SocketAddr, expected: u64, scenario: &str) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = load::get_json(proxy, "/stats").await;
    let requests = stats["totals"]["requests"].as_u64().unwrap_or(0);
    let completion = stats["totals"]["completion_tokens"].as_u64().unwrap_or(0);
    assert_eq!(
        requests, expected,
        "{scenario}: /stats counted {requests} requests, {expected} were sent"
    );
    assert_eq!(
        completion,
        expected * mock::COMPLETION_TOKENS,
        "{scenario}: /stats completion tokens"
    );
    assert_eq!(
        stats["totals"]["errors"].as_u64(),
        Some(0),
        "{scenario}: errors in /stats"
    );
}

async fn soak(proxy: &Process, seconds: u64) {
    let shape = Shape {
        body: chat_body("", 300, false),
        is_stream: false,
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let round = load::round(
            proxy.addr,
            &shape,
            Mode::Closed { concurrency: 16 },
            Measure::Total,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(round.failed, 0);
        samples.push(memory_mb(proxy.pid(), "VmRSS"));
    }
    let first = samples.first().copied().unwrap_or(f64::NAN);
    let last = samples.last().copied().unwrap_or(f64::NAN);
    let max = samples.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "soak: {seconds} s of S1, RSS sampled every 5 s: first {first:.1} MB, last {last:.1} MB, max {max:.1} MB ({:+.1}% first to last)",
        (last - first) / first * 100.0
    );
}

/// Size of the files in a directory, in MB.
fn dir_mb(dir: &std::path::Path) -> f64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len() as f64)
                .sum::<f64>()
        })
        .unwrap_or(0.0)
        / 1e6
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}
