//! llm-meter: a local reverse proxy that meters LLM traffic per API key and model.
//!
//! The data flow, one module per step:
//!
//! 1. `config` merges `proxy.toml`, `LLM_METER_*` variables and flags into one `Config`.
//! 2. `app` builds the shared state and the router; `server` accepts connections and serves them
//!    on its worker threads.
//! 3. `proxy` forwards each upstream's prefix (`/v1`, `/anthropic/v1`, declared ones) to it:
//!    `key` identifies the caller, `guard` admits it (named and virtual keys, budgets, rate
//!    limits), `proxy::route` picks the usage flavor, `proxy::rewrite` asks for stream usage
//!    when the client did not, and `proxy::tap` hands every response byte to the client as it
//!    arrives and, on the side, to the extractor. `proxy::websocket` relays upgraded
//!    connections message by message and meters each response inside them.
//! 4. `usage` turns each flavor's usage (OpenAI, Anthropic, Gemini; plain JSON or SSE) into one
//!    `Usage` record, or estimates it with a BPE tokenizer when the response reported none.
//! 5. `meter` prices the record in integer nano-dollars and adds it to per-key, per-model and
//!    per-upstream totals; `meter::ledger` writes every request to SQLite (or PostgreSQL,
//!    `meter::ledger::pg`) off the request path
//!    and restores the totals on start; `guard` adds its cost to the budgets and fires alerts.
//! 6. `api` shows the totals (`/stats`), resets them, reads history from the ledger (`/usage`,
//!    `/export`, the `report` and `export` commands), lists alerts and named keys, changes
//!    budgets (`/admin/keys`), renders `metrics` (`/metrics`, counted per request by
//!    `proxy::exchange`), serves the dashboard (`/`, a page drawn from those endpoints by its
//!    embedded script), estimates what a request will cost before it is sent (`/estimate`, the
//!    `estimate` command), and answers `/healthz`.
//!
//! `otlp` pushes a GenAI span per metered request (handed over by `proxy::exchange` through a
//! bounded queue) and the `metrics` series to an OpenTelemetry collector, from a background task.
//!
//! `cluster` syncs replicas that share a PostgreSQL ledger (`ledger_url`): each one's spend and
//! rate-limit use, budgets changed at run time, and which replica sends an alert.
//!
//! `attribution` reads the user, session and tags a request names in llm-meter's own headers
//! (removed before forwarding) or in its body.
//!
//! `logs` writes one line per request through a batching writer; `deferred` holds that line,
//! and the ledger writer's wake-up, until the response has gone out; `json` finds a body's
//! top-level fields without parsing the rest; `path` gives a request its canonical path;
//! `tasks` owns the background tasks; `client` opens upstream connections; `worker` says which
//! worker thread runs.
//!
//! # Layers
//!
//! A module imports only modules of its own layer or below (`tests/layers.rs` checks it):
//!
//! | layer | modules | one job |
//! |---|---|---|
//! | 1 | `key`, `attribution`, `json`, `error`, `path`, `deferred`, `worker`, `tasks`, `client` | the pieces every layer uses |
//! | 2 | `usage` | one normalized usage from every flavor |
//! | 3 | `money` | amounts in nano-dollars, and what a usage costs at a price |
//! | 4 | `config`, `logs` | validated settings; the log writer they configure |
//! | 5 | `meter` | totals in memory, the ledger, prices per model |
//! | 6 | `guard`, `metrics`, `otlp` | admission: named keys, budgets, rate limits, alerts; the Prometheus series; their OpenTelemetry export |
//! | 7 | `proxy`, `cluster` | forwarding: route, rewrite, upstream, tap, the exchange's record, WebSockets; replicas sharing a PostgreSQL ledger's budgets, limits and alerts |
//! | 8 | `app` | `AppState`: config, meter, guard and upstreams, built once |
//! | 9 | `api` | our own endpoints and their router |
//! | 10 | `server` | accept, workers, timeouts, dispatch on the canonical path |
//! | 11 | `cli` | the command line |
//!
//! The client never waits for metering, and the full key is never stored, logged or shown.

pub mod api;
pub mod app;
pub mod attribution;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod deferred;
pub mod error;
pub mod guard;
pub mod json;
pub mod key;
pub mod logs;
pub mod meter;
pub mod metrics;
pub mod money;
pub mod otlp;
pub mod path;
pub mod proxy;
pub mod server;
pub mod tasks;
pub mod usage;
pub mod worker;

pub use app::AppState;
pub use config::Config;
pub use server::run;
