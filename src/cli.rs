//! Command-line definitions (clap) only; merging with the environment and file is `config`'s job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Flags;

/// A local reverse proxy that meters LLM API traffic: tokens and cost per API key and model.
///
/// Point your client at it (OPENAI_BASE_URL=http://localhost:8080/v1), then
/// `curl localhost:8080/stats`. Values come from flags, then LLM_METER_* environment
/// variables, then proxy.toml, then defaults.
#[derive(Debug, Parser)]
#[command(name = "llm-meter", version, about, long_about)]
pub struct Cli {
    /// Config file [env: LLM_METER_CONFIG] [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,

    /// Address to listen on [env: LLM_METER_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", global = true)]
    pub listen: Option<String>,

    /// A separate address for llm-meter's own endpoints (/stats, /usage, /admin, ...); the main
    /// address then serves provider routes and /healthz only [env: LLM_METER_ADMIN_LISTEN].
    #[arg(long, value_name = "ADDR", global = true)]
    pub admin_listen: Option<String>,

    /// Upstream base URL that /v1/* is forwarded to, /v1 included
    /// [env: LLM_METER_UPSTREAM] [default: https://api.openai.com/v1].
    #[arg(long, value_name = "URL", global = true)]
    pub upstream: Option<String>,

    /// Log line format: text or json [env: LLM_METER_LOG_FORMAT] [default: text].
    /// The level comes from RUST_LOG (default: info).
    #[arg(long, value_name = "FORMAT", global = true)]
    pub log_format: Option<String>,

    /// Worker threads serving requests [env: LLM_METER_THREADS] [default: one per CPU core, at
    /// most 4]. Each serves its connections start to end with its own upstream connections.
    #[arg(long, value_name = "N", global = true)]
    pub threads: Option<String>,

    /// Directory of the ledger, the SQLite file every request is written to
    /// [env: LLM_METER_DATA_DIR] [default: $XDG_DATA_HOME/llm-meter or ~/.local/share/llm-meter].
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Keep totals in memory only: nothing is written, a restart starts from zero
    /// [env: LLM_METER_PERSIST=false].
    #[arg(long, global = true)]
    pub no_persist: bool,

    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Serve,
    /// Exit 0 if the llm-meter at the configured listen address answers /healthz (for container health checks).
    Healthcheck,
    /// Print spend from the ledger as a table with totals; works with or without the server running.
    Report(ReportArgs),
    /// Write the ledger's rows to stdout as CSV or JSON lines (no key material).
    Export(ExportArgs),
}

/// `llm-meter report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// today, week (since Monday), month, or all; days start at 00:00 UTC.
    #[arg(long, default_value = "today")]
    pub period: String,
    /// Rows per model, key, day or hour; combine with commas (day,model).
    #[arg(long, default_value = "model")]
    pub by: String,
    /// Start instead of the period's: RFC 3339 time, date (2026-11-25) or span back (24h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// End (exclusive), same forms as --since [default: now].
    #[arg(long)]
    pub until: Option<String>,
}

/// `llm-meter export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// csv or jsonl.
    #[arg(long, default_value = "csv")]
    pub format: String,
    /// First time included: RFC 3339 time, date (2026-11-25) or span back (24h, 7d) [default: the first row].
    #[arg(long)]
    pub since: Option<String>,
    /// End (exclusive), same forms as --since [default: now].
    #[arg(long)]
    pub until: Option<String>,
}

impl Cli {
    /// The flag layer of the configuration.
    pub fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            upstream: self.upstream.clone(),
            log_format: self.log_format.clone(),
            threads: self.threads.clone(),
            data_dir: self.data_dir.clone(),
            no_persist: self.no_persist,
        }
    }
}
