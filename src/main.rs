//! The `llm-meter` binary: flags → config → tracing → bind → `llm_meter::run`; failures become exit codes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llm_meter::api::remote;
use llm_meter::cli::{Cli, Command, PricesAction, PricesArgs};
use llm_meter::config::Config;
use llm_meter::{AppState, api};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            // A bad value of a closed list: say which values there are.
            let values = rendered
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("[possible values:"))
                .map(|l| format!(" {l}"))
                .unwrap_or_default();
            eprintln!(
                "llm-meter: {}{values} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let (flags, env) = (cli.flags(), llm_meter_env());
    let config = match Config::load(&flags, &env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("llm-meter: config error: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Healthcheck(_)) => healthcheck(&config),
        Some(Command::Stats(args)) => stats(&config, args.watch),
        Some(Command::Report(args)) => print(api::report::run(&config, &args.request())),
        Some(Command::Estimate(args)) => print(api::estimate::run(&config, &args.command())),
        Some(Command::Export(args)) => {
            let stdout = std::io::stdout();
            print(
                api::history::export_to(&config, &args.request(), &mut stdout.lock())
                    .map(|()| String::new()),
            )
        }
        Some(Command::Prices(PricesArgs {
            action: Some(PricesAction::Update(update)),
            ..
        })) => print(api::prices::update(&config, &update.url, update.force)),
        Some(Command::Prices(args)) => print(api::prices::explain(
            &config,
            &args.upstream,
            &args.models,
            args.json,
        )),
        Some(Command::Reprice(args)) => print(api::reprice::run(
            &config,
            args.since.as_deref(),
            args.until.as_deref(),
            args.dry_run,
        )),
        Some(Command::Serve(_)) | None => serve(config, Reload { flags, env }),
    }
}

/// The process environment (its UTF-8 variables): `LLM_METER_*`, the two that place the default
/// data directory, and whichever variables named keys read their keys from (`key_env`).
fn llm_meter_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

fn serve(config: Config, reload: Reload) -> ExitCode {
    let _log_guard = match llm_meter::logs::init(config.log_format) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("llm-meter: cannot start the log writer: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Worker 0: `llm_meter::run` starts the other workers on threads of their own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llm-meter: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Every client connection holds a descriptor, and most an upstream one too.
    llm_meter::server::limits::raise_descriptor_limit();
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("llm-meter: cannot listen on {}: {err}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let admin = match config.admin_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(err) => {
                    eprintln!("llm-meter: cannot listen on {addr} (admin_listen): {err}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let addr = listener.local_addr().unwrap_or(config.listen);
        let own = match admin.as_ref().and_then(|l| l.local_addr().ok()) {
            Some(admin) => format!(", own endpoints on http://{admin}"),
            None => String::new(),
        };
        let routes: Vec<String> = config
            .routes
            .iter()
            .map(|r| match &r.egress.proxy {
                Some((proxy, from)) => {
                    format!("{} to {} through {proxy} ({from})", r.prefix, r.upstream)
                }
                None => format!("{} to {}", r.prefix, r.upstream),
            })
            .collect();
        let routes = routes.join(", ");
        warn_if_exposed(&config);
        let state = match AppState::new(config) {
            Ok(state) => state,
            Err(err) => {
                eprintln!("llm-meter: {err}");
                return ExitCode::FAILURE;
            }
        };
        let ledger = state.meter.ledger().map_or_else(
            || "not persisted (--no-persist)".to_owned(),
            |l| format!("ledger {}", l.path().display()),
        );
        let shutdown = shutdown_signal();
        // Installed before the start-up line, as the shutdown handlers are: a SIGHUP sent as
        // soon as it is out must reload, not end the process.
        reload_prices_on_hangup(&state.meter, reload);
        println!("llm-meter listening on http://{addr}{own}, forwarding {routes}; {ledger}");
        let meter = std::sync::Arc::clone(&state.meter);
        let cluster = state.cluster.clone();
        let listeners = llm_meter::server::Listeners {
            main: listener,
            admin,
            peer_as: None,
        };
        let served = llm_meter::server::run_with(listeners, state, shutdown).await;
        // Estimates still running count what is left by its bytes; then whatever happened,
        // write out what was recorded.
        llm_meter::usage::estimate::hurry();
        meter.close();
        // After the last rows: its final sync publishes this replica's spend to the others.
        if let Some(cluster) = cluster {
            cluster.stop();
        }
        if let Err(err) = served {
            eprintln!("llm-meter: server error: {err}");
            return ExitCode::FAILURE;
        }
        println!(
            "llm-meter stopped. {}",
            api::stats::summary_line(&meter.snapshot().totals)
        );
        ExitCode::SUCCESS
    })
}

/// Warns when our own endpoints are reachable off this machine without an admin token: anyone
/// who reaches the port can read who spends what.
fn warn_if_exposed(config: &Config) {
    let own = config.admin_listen.unwrap_or(config.listen);
    if config.admin_token.is_none() && !own.ip().is_loopback() {
        tracing::warn!(
            listen = %own,
            "llm-meter's own endpoints (/stats, /usage, /export, /alerts) are reachable off this machine and no admin token is set: anyone who reaches the port can read them; changes are taken from loopback only (set LLM_METER_ADMIN_TOKEN, or admin_listen = \"127.0.0.1:9090\")"
        );
    }
}

/// Prints a command's output, or its error on stderr with exit code 1.
fn print(result: Result<String, api::CommandError>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("llm-meter: {err}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(config: &Config) -> ExitCode {
    match remote::probe_health(remote::reachable(config.listen), Duration::from_secs(3)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llm-meter: unhealthy: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `llm-meter stats [--watch]`: the running server's totals table, once or until Ctrl-C.
fn stats(config: &Config, watch: bool) -> ExitCode {
    let source = remote::StatsSource::of(config);
    let shown = if watch {
        let stdout = std::io::stdout();
        let is_terminal = stdout.is_terminal();
        source.watch(&mut stdout.lock(), is_terminal, remote::WATCH_EVERY)
    } else {
        source.table().map(|table| print!("{table}"))
    };
    match shown {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llm-meter: stats: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What a reload reads the settings from again: the flags and environment given at start.
struct Reload {
    flags: llm_meter::config::Flags,
    env: HashMap<String, String>,
}

/// On SIGHUP, reads the settings and price files again and prices requests from then on with
/// them; when they cannot be read, says why and keeps the prices in force.
fn reload_prices_on_hangup(meter: &std::sync::Arc<llm_meter::meter::Meter>, reload: Reload) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        let meter = std::sync::Arc::clone(meter);
        let reload = std::sync::Arc::new(reload);
        #[expect(
            clippy::disallowed_methods,
            reason = "lives as long as the process; nothing to wait for at shutdown"
        )]
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let meter = std::sync::Arc::clone(&meter);
                let reload = std::sync::Arc::clone(&reload);
                // Files are read and parsed off the runtime's thread.
                let done = tokio::task::spawn_blocking(move || {
                    llm_meter::app::reload_prices(&meter, &reload.flags, &reload.env)
                })
                .await;
                match done {
                    Ok(Ok(notes)) => {
                        tracing::info!("prices reloaded on SIGHUP: {}", notes.join("; "))
                    }
                    Ok(Err(err)) => tracing::warn!(
                        "prices not reloaded on SIGHUP, the previous ones stay: {err}"
                    ),
                    Err(err) => tracing::warn!("prices not reloaded on SIGHUP: {err}"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (meter, reload);
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (docker stop). The handlers are installed when this
/// is called, not when the future is first polled, so a signal sent as soon as the startup line
/// is out is not taken by the default action (which would end the process at once).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let (Ok(mut interrupt), Ok(mut terminate)) = (interrupt, terminate) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
