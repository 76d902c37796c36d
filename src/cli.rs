//! Command-line definitions (clap) only; merging with the environment and file is `config`'s job.
//!
//! Each command takes only the options it uses: serving takes them all, at the top level (no
//! command) or after `serve`; `report` and `export` take where the ledger is; `healthcheck`
//! and `stats` take where the server listens; `estimate` takes only the config file.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use crate::config::Flags;
use crate::meter::ledger::history::{Filter, Group, parse_time};

/// A local reverse proxy that meters LLM API traffic: tokens and cost per API key and model.
///
/// Point your client at it (OPENAI_BASE_URL=http://localhost:8080/v1), then
/// `llm-meter stats` (or `curl localhost:8080/stats`). Values come from flags, then LLM_METER_* environment
/// variables, then proxy.toml, then defaults.
#[derive(Debug, Parser)]
#[command(name = "llm-meter", version, about, long_about)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// The serving options, when no command is given.
    #[command(flatten)]
    pub serve: ServeArgs,

    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Serve(ServeArgs),
    /// Exit 0 if the llm-meter at the configured listen address answers /healthz (for container health checks).
    Healthcheck(HealthcheckArgs),
    /// Print a running llm-meter's totals (/stats?format=text); --watch refreshes them every 2 s.
    Stats(StatsArgs),
    /// Print spend from the ledger as a table with totals; works with or without the server running.
    Report(ReportArgs),
    /// Write the ledger's rows to stdout as CSV or JSON lines (no key material).
    Export(ExportArgs),
    /// Print what a request body will cost before it is sent: input tokens, price, cost range
    /// (offline: the tokenizer counts; POST /estimate on a running server can ask Anthropic).
    Estimate(EstimateArgs),
    /// Show how model names are priced (entry, rates, source, tiers); `prices update`
    /// downloads the current LiteLLM price map into the data directory.
    Prices(PricesArgs),
    /// Recompute the ledger's stored costs from their tokens with today's prices; prints old
    /// and new totals per model, then writes them in one transaction (--dry-run: nothing).
    Reprice(RepriceArgs),
}

/// `llm-meter reprice`.
#[derive(Debug, Args)]
pub struct RepriceArgs {
    /// Where the ledger and price files are.
    #[command(flatten)]
    pub files: PriceFileArgs,
    /// First time repriced: RFC 3339 time, date (2026-11-25) or span back (24h, 7d) [default: the first row].
    #[arg(long, value_parser = time)]
    pub since: Option<String>,
    /// End (exclusive), same forms as --since [default: now].
    #[arg(long, value_parser = time)]
    pub until: Option<String>,
    /// Print what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `llm-meter prices [MODEL…]` and `llm-meter prices update`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PricesArgs {
    /// Download the price map.
    #[command(subcommand)]
    pub action: Option<PricesAction>,

    /// Model names, as clients send them.
    #[arg(value_name = "MODEL")]
    pub models: Vec<String>,

    /// The upstream the names are priced on (its multiplier and own prices apply).
    #[arg(long, value_name = "NAME", default_value = "openai")]
    pub upstream: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The files prices are read from.
    #[command(flatten)]
    pub files: PriceFileArgs,
}

/// What `prices` does besides explaining.
#[derive(Debug, Subcommand)]
pub enum PricesAction {
    /// Download the current LiteLLM price map, check it, keep the previous copy, and print
    /// what changed; a running llm-meter takes it on SIGHUP or restart.
    Update(PricesUpdateArgs),
}

/// `llm-meter prices update`.
#[derive(Debug, Args)]
pub struct PricesUpdateArgs {
    /// Where to download from.
    #[arg(long, value_name = "URL", default_value = crate::api::prices::DEFAULT_URL)]
    pub url: String,

    /// Save the file even when it lists fewer than half the models of the prices in use.
    #[arg(long)]
    pub force: bool,

    /// The files prices are read from.
    #[command(flatten)]
    pub files: PriceFileArgs,
}

/// Where the settings and price files are: the config file and data directory, and a
/// `pricing_file`.
#[derive(Debug, Args)]
pub struct PriceFileArgs {
    /// The config file and data directory.
    #[command(flatten)]
    pub ledger: LedgerArgs,

    /// A LiteLLM-format price map read over the built-in prices [env: LLM_METER_PRICING_FILE].
    #[arg(long, value_name = "PATH")]
    pub pricing_file: Option<PathBuf>,
}

impl PriceFileArgs {
    fn flags(&self) -> Flags {
        Flags {
            pricing_file: self.pricing_file.clone(),
            ..self.ledger.flags()
        }
    }
}

/// `llm-meter [serve]`: every option of the server.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Config file [env: LLM_METER_CONFIG] [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address to listen on [env: LLM_METER_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// A separate address for llm-meter's own endpoints (/stats, /usage, /admin, ...); the main
    /// address then serves provider routes and /healthz only [env: LLM_METER_ADMIN_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// Upstream base URL that /v1/* is forwarded to, /v1 included
    /// [env: LLM_METER_UPSTREAM] [default: https://api.openai.com/v1].
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,

    /// Log line format: text or json [env: LLM_METER_LOG_FORMAT] [default: text].
    /// The level comes from RUST_LOG (default: info).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Worker threads serving requests [env: LLM_METER_THREADS] [default: one per CPU core, at
    /// most 4]. Each serves its connections start to end with its own upstream connections.
    #[arg(long, value_name = "N")]
    pub threads: Option<String>,

    /// Directory of the ledger, the SQLite file every request is written to
    /// [env: LLM_METER_DATA_DIR] [default: $XDG_DATA_HOME/llm-meter or ~/.local/share/llm-meter].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Keep totals in memory only: nothing is written, a restart starts from zero
    /// [env: LLM_METER_PERSIST=false].
    #[arg(long)]
    pub no_persist: bool,

    /// A LiteLLM-format price map read over the built-in prices
    /// [env: LLM_METER_PRICING_FILE].
    #[arg(long, value_name = "PATH")]
    pub pricing_file: Option<PathBuf>,

    /// Keep the ledger in PostgreSQL (postgres://user@host/db), shared by every replica given
    /// the same URL, instead of the SQLite file [env: LLM_METER_LEDGER_URL].
    #[arg(long, value_name = "URL")]
    pub ledger_url: Option<String>,
}

/// `llm-meter healthcheck`: where the server listens.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Config file [env: LLM_METER_CONFIG] [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address the server listens on [env: LLM_METER_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `llm-meter stats`: where the server's own endpoints listen.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Config file [env: LLM_METER_CONFIG] [default: ./proxy.toml when it exists]. Its admin
    /// token (or LLM_METER_ADMIN_TOKEN) is sent when set.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address the server listens on [env: LLM_METER_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// The server's admin_listen, asked instead of --listen when set [env: LLM_METER_ADMIN_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// Refresh every 2 seconds until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

/// Where the ledger is, for the commands that read it.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// Config file [env: LLM_METER_CONFIG] [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Data directory: the ledger, and the prices `prices update` saves [env: LLM_METER_DATA_DIR]
    /// [default: $XDG_DATA_HOME/llm-meter or ~/.local/share/llm-meter].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `llm-meter report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Where the ledger is.
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// The PostgreSQL ledger, when it is kept there [env: LLM_METER_LEDGER_URL].
    #[arg(long, value_name = "URL")]
    pub ledger_url: Option<String>,
    /// The calendar period: week starts on Monday, days at 00:00 UTC.
    #[arg(long, default_value = "today", value_parser = periods())]
    pub period: String,
    /// Rows per model, key, upstream, day, hour, user, session or tag.NAME; combine with
    /// commas (day,model or tag.team,user).
    #[arg(long, default_value = "model", value_parser = groups)]
    pub by: String,
    /// Start instead of the period's: RFC 3339 time, date (2026-11-25) or span back (24h, 7d).
    #[arg(long, value_parser = time)]
    pub since: Option<String>,
    /// End (exclusive), same forms as --since [default: now].
    #[arg(long, value_parser = time)]
    pub until: Option<String>,
    /// text: a table; json: one document with the fields of /usage.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Only rows where NAME is VALUE: key (id), model, user, session or tag.NAME; repeat to
    /// combine (--where tag.team=search --where user=alice).
    #[arg(long = "where", value_name = "NAME=VALUE", value_parser = condition)]
    pub filters: Vec<String>,
}

/// `llm-meter export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Where the ledger is.
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// The PostgreSQL ledger, when it is kept there [env: LLM_METER_LEDGER_URL].
    #[arg(long, value_name = "URL")]
    pub ledger_url: Option<String>,
    /// The file format.
    #[arg(long, default_value = "csv", value_parser = export_formats())]
    pub format: String,
    /// First time included: RFC 3339 time, date (2026-11-25) or span back (24h, 7d) [default: the first row].
    #[arg(long, value_parser = time)]
    pub since: Option<String>,
    /// End (exclusive), same forms as --since [default: now].
    #[arg(long, value_parser = time)]
    pub until: Option<String>,
    /// Only rows where NAME is VALUE, as for report.
    #[arg(long = "where", value_name = "NAME=VALUE", value_parser = condition)]
    pub filters: Vec<String>,
}

/// `llm-meter estimate`.
#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// The request body (JSON, as it would be sent to the provider); `-` reads stdin.
    #[arg(value_name = "FILE")]
    pub file: String,
    /// The API it is for [default: told from the body: contents -> gemini, messages with a
    /// top-level system or a claude model -> messages, input -> responses or embeddings,
    /// prompt -> completions, else chat].
    #[arg(long, value_parser = apis())]
    pub api: Option<String>,
    /// The upstream it would go to, by name [default: the first that speaks its API].
    #[arg(long, value_name = "NAME")]
    pub upstream: Option<String>,
    /// The model, over the body's (Gemini's requests name it in their path, not their body).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Print the JSON POST /estimate answers instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Config file, for its upstreams and prices [env: LLM_METER_CONFIG] [default:
    /// ./proxy.toml when it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

// The values are checked here, so that a bad one is a usage error (exit 2, like a bad flag);
// the commands read them again.

fn periods() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("today"),
        PossibleValue::new("day").hide(true),
        PossibleValue::new("week"),
        PossibleValue::new("month"),
        PossibleValue::new("all"),
    ])
}

fn apis() -> PossibleValuesParser {
    PossibleValuesParser::new(crate::api::estimate::APIS.map(|(name, _)| name))
}

fn export_formats() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("csv"),
        PossibleValue::new("jsonl"),
        PossibleValue::new("ndjson").hide(true),
    ])
}

fn groups(value: &str) -> Result<String, String> {
    Group::parse_list(value)
        .map(|_| value.to_owned())
        .map_err(String::from)
}

fn condition(value: &str) -> Result<String, String> {
    Filter::default()
        .add_written(value)
        .map(|()| value.to_owned())
        .map_err(String::from)
}

fn time(value: &str) -> Result<String, String> {
    parse_time(value, OffsetDateTime::now_utc())
        .map(|_| value.to_owned())
        .map_err(String::from)
}

impl ReportArgs {
    /// What the command asks the report for.
    pub fn request(&self) -> crate::api::report::Request {
        crate::api::report::Request {
            period: self.period.clone(),
            by: self.by.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            format: self.format.clone(),
            filters: self.filters.clone(),
        }
    }
}

impl ExportArgs {
    /// What the command asks the export for.
    pub fn request(&self) -> crate::api::history::ExportRequest {
        crate::api::history::ExportRequest {
            format: self.format.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            filters: self.filters.clone(),
        }
    }
}

impl EstimateArgs {
    /// What the command asks the estimate for.
    pub fn command(&self) -> crate::api::estimate::Command {
        crate::api::estimate::Command {
            file: self.file.clone(),
            api: self.api.clone(),
            upstream: self.upstream.clone(),
            model: self.model.clone(),
            is_json: self.json,
        }
    }
}

impl Cli {
    /// The flag layer of the configuration, from the options of the command given.
    pub fn flags(&self) -> Flags {
        match &self.command {
            None => self.serve.flags(),
            Some(Command::Serve(serve)) => serve.flags(),
            Some(Command::Healthcheck(args)) => Flags {
                config: args.config.clone(),
                listen: args.listen.clone(),
                ..Flags::default()
            },
            Some(Command::Stats(args)) => Flags {
                config: args.config.clone(),
                listen: args.listen.clone(),
                admin_listen: args.admin_listen.clone(),
                ..Flags::default()
            },
            Some(Command::Estimate(args)) => Flags {
                config: args.config.clone(),
                ..Flags::default()
            },
            Some(
                Command::Report(ReportArgs {
                    ledger, ledger_url, ..
                })
                | Command::Export(ExportArgs {
                    ledger, ledger_url, ..
                }),
            ) => Flags {
                ledger_url: ledger_url.clone(),
                ..ledger.flags()
            },
            Some(Command::Prices(PricesArgs {
                action: Some(PricesAction::Update(update)),
                ..
            })) => update.files.flags(),
            Some(Command::Prices(args)) => args.files.flags(),
            Some(Command::Reprice(args)) => args.files.flags(),
        }
    }
}

impl ServeArgs {
    fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            upstream: self.upstream.clone(),
            log_format: self.log_format.clone(),
            threads: self.threads.clone(),
            data_dir: self.data_dir.clone(),
            no_persist: self.no_persist,
            pricing_file: self.pricing_file.clone(),
            ledger_url: self.ledger_url.clone(),
        }
    }
}

impl LedgerArgs {
    fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            ..Flags::default()
        }
    }
}
