//! `POST /estimate[/PROVIDER_PATH]` and `llm-meter estimate FILE`: what a request will cost
//! before it is sent (its input tokens, the price that applies, and the cost from no output up
//! to its output limit), answered without forwarding it.

pub mod count_tokens;
pub mod quote;
pub mod request;

use std::fmt::Write as _;
use std::io::Read as _;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, Uri};
use serde::Serialize;

use super::CommandError;
use crate::app::{AppState, upstream_of};
use crate::config::{Config, Route};
use crate::error::ProxyError;
use crate::meter::pricing::PriceTable;
use crate::money::NanoUsd;
use crate::proxy::{read_body, route};
use crate::usage::Flavor;
pub use quote::{Quote, quote};
pub use request::{Hint, Read, Unestimable};

/// The endpoint's path; the provider path a client would call may follow it.
pub const PATH: &str = "/estimate";

/// Where the input count comes from when no provider was asked.
const TOKENIZER: &str = "tokenizer";

/// The answer: what a request will cost, from no output up to its output limit.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// The model the request names (`null` when it names none).
    pub model: Option<String>,
    /// How it would be metered (`openai_chat`, `anthropic_messages`, ...).
    pub flavor: &'static str,
    /// The upstream it would go to (`null` when none speaks its API).
    pub upstream: Option<String>,
    /// Its input tokens.
    pub input_tokens: u64,
    /// `tokenizer`, `count_tokens`, or `tokenizer (count_tokens failed: REASON)`.
    pub input_tokens_source: String,
    /// The most output tokens it may cost (0 for embeddings; `null` when no limit is known).
    pub max_output_tokens: Option<u64>,
    /// `request`, `model limit` or `no output`; `null` with no limit.
    pub max_output_tokens_source: Option<&'static str>,
    /// Whether a price is known for the model.
    pub priced: bool,
    /// That price (`null` when unpriced).
    pub price: Option<PriceView>,
    /// The cost range (nulls when unpriced).
    pub cost: CostRange,
    /// The price, exact, for the summary.
    #[serde(skip)]
    quote: Option<Quote>,
}

/// A quote as the answer shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PriceView {
    /// Where the price comes from.
    pub source: String,
    /// The provider's tier it is.
    pub tier: String,
    /// USD per million tokens of each class.
    pub per_million_usd: Rates,
}

/// USD per million tokens of each class.
#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    /// Uncached input.
    pub input: f64,
    /// Output.
    pub output: f64,
    /// Input read from the provider's cache.
    pub cached_input: f64,
    /// Input written to the provider's cache.
    pub cache_write: f64,
}

/// From the input alone at the input rate, to that plus the output limit at the output rate.
#[derive(Debug, Clone, Serialize)]
pub struct CostRange {
    /// With no output.
    pub min_usd: Option<f64>,
    /// With `max_output_tokens` of output (`null` when no limit is known).
    pub max_usd: Option<f64>,
    #[serde(skip)]
    min: Option<NanoUsd>,
    #[serde(skip)]
    max: Option<NanoUsd>,
}

impl Estimate {
    /// Prices a request read as `read`, with `input_tokens` counted by `source`.
    pub fn new(
        prices: &PriceTable,
        routes: &[Route],
        read: Read,
        input_tokens: u64,
        source: String,
    ) -> Self {
        let upstream = read
            .upstream
            .and_then(|i| routes.get(i))
            .map(|r| r.name.clone());
        let quote = read.model.as_deref().and_then(|model| {
            quote(
                prices,
                upstream.as_deref(),
                model,
                input_tokens,
                read.service_tier,
            )
        });
        let model_limit = quote.as_ref().and_then(|q| q.max_output_tokens);
        let (max_output_tokens, max_output_tokens_source) = match read.max_output_tokens {
            Some(0) if read.flavor == Flavor::OpenAiEmbeddings => (Some(0), Some("no output")),
            Some(limit) => (Some(limit), Some("request")),
            None => (model_limit, model_limit.map(|_| "model limit")),
        };
        let min = quote.as_ref().map(|q| q.cost(input_tokens, 0));
        let max = quote
            .as_ref()
            .zip(max_output_tokens)
            .map(|(q, output)| q.cost(input_tokens, output));
        Self {
            model: read.model,
            flavor: read.flavor.as_str(),
            upstream,
            input_tokens,
            input_tokens_source: source,
            max_output_tokens,
            max_output_tokens_source,
            priced: quote.is_some(),
            price: quote.as_ref().map(|q| PriceView {
                per_million_usd: Rates {
                    input: q.input.as_usd(),
                    output: q.output.as_usd(),
                    cached_input: q.cached_input.as_usd(),
                    cache_write: q.cache_write.as_usd(),
                },
                source: q.source.clone(),
                tier: q.tier.clone(),
            }),
            cost: CostRange {
                min_usd: min.map(NanoUsd::as_usd),
                max_usd: max.map(NanoUsd::as_usd),
                min,
                max,
            },
            quote,
        }
    }

    /// A few lines for a person: the model, the input, the price and the cost range.
    pub fn summary(&self) -> String {
        let model = self.model.as_deref().unwrap_or("(no model named)");
        let upstream = self.upstream.as_deref().unwrap_or("no upstream");
        let mut out = format!("{model} via {upstream} ({})\n", self.flavor);
        let _ = writeln!(
            out,
            "input       {} tokens ({})",
            self.input_tokens, self.input_tokens_source
        );
        let _ = match (self.max_output_tokens, self.max_output_tokens_source) {
            (Some(limit), Some(source)) => writeln!(out, "max output  {limit} tokens ({source})"),
            _ => writeln!(out, "max output  unknown (no max_tokens in the request)"),
        };
        let _ = match &self.quote {
            Some(quote) => writeln!(
                out,
                "price       {} input, {} output per million tokens; {}, {} tier",
                quote.input, quote.output, quote.source, quote.tier
            ),
            None if self.model.is_none() => writeln!(out, "price       unknown: no model named"),
            None => writeln!(
                out,
                "price       unknown: {model} has no price (add it under [pricing] in proxy.toml)"
            ),
        };
        let _ = match (self.cost.min, self.cost.max) {
            (Some(min), Some(max)) => writeln!(out, "cost        {min} to {max}"),
            (Some(min), None) => writeln!(out, "cost        {min} with no output; no upper bound"),
            _ => writeln!(out, "cost        unknown"),
        };
        out
    }
}

/// `POST /estimate` and `POST /estimate/PROVIDER_PATH`: the estimate of the request in the body.
pub async fn answer(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match estimate(state, uri.path(), &headers, body).await {
        Ok(estimate) => Json(estimate).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn estimate(
    state: AppState,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Estimate, ProxyError> {
    let config = &state.config;
    let hint = hint_of(&config.routes, path)?;
    // Capped and timed as a forwarded body is, with the same 413 and 408.
    let body = read_body(body, config.max_body_bytes, config.header_timeout).await?;
    let wants_count = count_tokens::has_key(headers, config.admin_token.is_some());
    let reading = state.clone();
    // Parsing a large body and counting its tokens is CPU work: off the async threads.
    let mut read = tokio::task::spawn_blocking(move || {
        request::read(&reading.config.routes, &hint, &body, wants_count)
    })
    .await
    .map_err(|_| ProxyError::Internal)?
    .map_err(|err| ProxyError::CannotEstimate(err.to_string()))?;
    let (input_tokens, source) = match (read.count_body.take(), read.upstream) {
        (Some(count_body), Some(upstream)) => {
            match count_tokens::count(&state, upstream, headers, count_body).await {
                Ok(counted) => (counted, "count_tokens".to_owned()),
                Err(failure) => (
                    read.input_tokens,
                    format!("{TOKENIZER} (count_tokens failed: {failure})"),
                ),
            }
        }
        _ => (read.input_tokens, TOKENIZER.to_owned()),
    };
    Ok(Estimate::new(
        &state.meter.prices(),
        &config.routes,
        read,
        input_tokens,
        source,
    ))
}

/// What the path after `/estimate` says: nothing (the body tells), or a metered provider route.
fn hint_of(routes: &[Route], path: &str) -> Result<Hint, ProxyError> {
    let rest = path.strip_prefix(PATH).unwrap_or_default();
    if rest.is_empty() || rest == "/" {
        return Ok(Hint::default());
    }
    let unmetered = || {
        ProxyError::CannotEstimate(format!(
            "{rest} is not a metered provider route (such as /estimate/v1/chat/completions or /estimate/anthropic/v1/messages)"
        ))
    };
    let index = upstream_of(routes, rest).ok_or_else(unmetered)?;
    let route = routes.get(index).ok_or_else(unmetered)?;
    let under = rest.strip_prefix(route.prefix.as_str()).unwrap_or_default();
    let metered = route::classify(route.flavor, &Method::POST, under).ok_or_else(unmetered)?;
    Ok(Hint {
        flavor: Some(metered.flavor),
        upstream: Some(index),
        model: metered.path_model.map(str::to_owned),
    })
}

/// What `llm-meter estimate` asks.
#[derive(Debug, Clone)]
pub struct Command {
    /// The request body's file, or `-` for stdin.
    pub file: String,
    /// The API (`chat`, `completions`, `responses`, `embeddings`, `messages`, `gemini`).
    pub api: Option<String>,
    /// The upstream's name.
    pub upstream: Option<String>,
    /// The model, over the body's.
    pub model: Option<String>,
    /// JSON (the endpoint's answer) instead of the summary.
    pub is_json: bool,
}

/// The values `--api` takes, and the flavor each names.
pub const APIS: [(&str, Flavor); 6] = [
    ("chat", Flavor::OpenAiChat),
    ("completions", Flavor::OpenAiCompletions),
    ("responses", Flavor::OpenAiResponses),
    ("embeddings", Flavor::OpenAiEmbeddings),
    ("messages", Flavor::AnthropicMessages),
    ("gemini", Flavor::Gemini),
];

/// `llm-meter estimate FILE`: the estimate, offline (the tokenizer's count, never the
/// provider's), as a summary or as the endpoint's JSON.
pub fn run(config: &Config, command: &Command) -> Result<String, CommandError> {
    let body = read_input(&command.file, config.max_body_bytes)?;
    let routes = &config.routes;
    let upstream = match &command.upstream {
        Some(name) => Some(routes.iter().position(|r| r.name == *name).ok_or_else(|| {
            let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
            CommandError::Estimate(format!(
                "no upstream is named {name:?} (there are {})",
                names.join(", ")
            ))
        })?),
        None => None,
    };
    let flavor = command
        .api
        .as_deref()
        .and_then(|api| APIS.iter().find(|(name, _)| *name == api))
        .map(|(_, flavor)| *flavor);
    let hint = Hint {
        flavor,
        upstream,
        model: command.model.clone(),
    };
    let read = request::read(routes, &hint, &body, false)
        .map_err(|err| CommandError::Estimate(err.to_string()))?;
    let prices = crate::meter::pricing::load::load(&config.pricing)?.table;
    let input_tokens = read.input_tokens;
    let estimate = Estimate::new(&prices, routes, read, input_tokens, TOKENIZER.to_owned());
    if command.is_json {
        Ok(serde_json::to_string_pretty(&estimate)? + "\n")
    } else {
        Ok(estimate.summary())
    }
}

/// The body in `file` (`-`: stdin), refused past `limit` bytes as the endpoint refuses it.
fn read_input(file: &str, limit: usize) -> Result<Vec<u8>, CommandError> {
    let failed = |source| CommandError::Read {
        path: file.to_owned(),
        source,
    };
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut body = Vec::new();
    if file == "-" {
        std::io::stdin()
            .lock()
            .take(cap)
            .read_to_end(&mut body)
            .map_err(failed)?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(cap).read_to_end(&mut body))
            .map_err(failed)?;
    }
    if body.len() > limit {
        return Err(CommandError::Estimate(format!(
            "{file} is larger than max_body_bytes ({limit} bytes)"
        )));
    }
    Ok(body)
}
