//! The `prices` commands: how each model name is priced (`prices MODEL…`), and downloading the
//! current LiteLLM price map into the data directory (`prices update`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;

use super::CommandError;
use crate::config::Config;
use crate::meter::pricing::litellm::{self, PriceMap};
use crate::meter::pricing::load::{self, Loaded};
use crate::meter::pricing::{Dated, Match, PriceTable, Rates, Resolved, ppm_text};
use crate::money::{Ladder, Price};

/// Where `prices update` downloads from unless `--url` says: LiteLLM's maintained file.
pub const DEFAULT_URL: &str =
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json";

/// Longest the download may take, connecting included.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Changed prices listed one by one; past it they are counted.
const CHANGES_SHOWN: usize = 10;

/// How each of `models` resolves on `upstream`, as text or JSON.
pub fn explain(
    config: &Config,
    upstream: &str,
    models: &[String],
    json: bool,
) -> Result<String, CommandError> {
    let Loaded { table, notes } = load::load(&config.pricing)?;
    if json {
        let all: Vec<_> = models
            .iter()
            .map(|model| explain_json(&table, upstream, model))
            .collect();
        return Ok(serde_json::to_string_pretty(&all)? + "\n");
    }
    let mut out = String::new();
    if models.is_empty() {
        let _ = writeln!(out, "Price sources, lowest precedence first:");
        for source in table.sources() {
            let _ = writeln!(out, "  {source}");
        }
        for note in notes {
            let _ = writeln!(out, "  ({note})");
        }
        out.push_str("Give model names to see how each is priced.\n");
        return Ok(out);
    }
    for model in models {
        explain_text(&mut out, &table, upstream, model);
    }
    Ok(out)
}

fn found_by(resolved: &Resolved) -> &'static str {
    match resolved.found_by {
        Match::Exact => "its own entry",
        Match::Form => "a normalized form of the name",
        Match::Alias => "[models] alias",
    }
}

fn explain_text(out: &mut String, table: &PriceTable, upstream: &str, model: &str) {
    let _ = writeln!(out, "{model}");
    let Some(resolved) = table.resolve(upstream, model) else {
        let _ = writeln!(
            out,
            "  no price: its tokens are counted, its cost is not (add [pricing.\"{model}\"] to proxy.toml, a pricing_file, or run `llm-meter prices update`)\n"
        );
        return;
    };
    let _ = writeln!(
        out,
        "  entry {} (found by {}) on upstream {upstream}",
        resolved.entry,
        found_by(&resolved)
    );
    if let Some(ppm) = resolved.multiplier_ppm {
        let _ = writeln!(
            out,
            "  times the upstream's pricing_multiplier {}",
            ppm_text(ppm)
        );
    }
    for (depth, level) in resolved.levels().enumerate() {
        if depth > 0 {
            let _ = writeln!(out, "  before those, entry {}:", level.entry);
        }
        for dated in level.versions.iter() {
            let since = dated.since.map_or_else(String::new, |s| {
                jiff::Timestamp::from_second(s)
                    .map(|t| format!(" since {}", t.strftime("%Y-%m-%d %H:%M UTC")))
                    .unwrap_or_default()
            });
            let _ = writeln!(out, "  {}{since}, USD per million tokens:", dated.source);
            price_lines(out, &dated.price);
        }
    }
    out.push('\n');
}

fn price_lines(out: &mut String, price: &Price) {
    let tiers = [
        ("standard", Some(&price.standard)),
        ("flex", price.flex.as_ref()),
        ("priority", price.priority.as_ref()),
        ("batch", price.batch.as_ref()),
    ];
    for (tier, ladder) in tiers {
        let Some(ladder) = ladder else { continue };
        let _ = writeln!(out, "    {tier:<9} {}", rates_text(&ladder.base));
        for (threshold, rates) in &ladder.above {
            let _ = writeln!(
                out,
                "    {:<9} {} (whole request, prompt over {} tokens)",
                format!(">{}k", threshold / 1000),
                rates_text(rates),
                threshold
            );
        }
    }
    if let Some(max) = price.max_output_tokens {
        let _ = writeln!(out, "    max output tokens {max}");
    }
}

fn rates_text(rates: &Rates) -> String {
    let [input, output, cached, write, write_1h] = rates.usd_per_million();
    format!(
        "input {input}, output {output}, cache read {cached}, cache write {write}, 1h cache write {write_1h}"
    )
}

fn explain_json(table: &PriceTable, upstream: &str, model: &str) -> serde_json::Value {
    let Some(resolved) = table.resolve(upstream, model) else {
        return serde_json::json!({ "model": model, "upstream": upstream, "priced": false });
    };
    let versions: Vec<_> = resolved
        .levels()
        .flat_map(|level| level.versions.iter().map(|d| dated_json(&level.entry, d)))
        .collect();
    serde_json::json!({
        "model": model,
        "upstream": upstream,
        "priced": true,
        "entry": &*resolved.entry,
        "found_by": match resolved.found_by {
            Match::Exact => "exact",
            Match::Form => "form",
            Match::Alias => "alias",
        },
        "multiplier": resolved.multiplier_ppm.map(|ppm| ppm as f64 / 1e6),
        "prices": versions,
    })
}

fn dated_json(entry: &str, dated: &Dated) -> serde_json::Value {
    let ladder = |ladder: Option<&Ladder>| {
        ladder.map(|l| {
            serde_json::json!({
                "base": rates_json(&l.base),
                "above": l.above.iter().map(|(threshold, rates)| serde_json::json!({
                    "prompt_tokens_over": threshold,
                    "rates": rates_json(rates),
                })).collect::<Vec<_>>(),
            })
        })
    };
    let price = &dated.price;
    serde_json::json!({
        "entry": entry,
        "source": &*dated.source,
        "since": dated.since,
        "standard": ladder(Some(&price.standard)),
        "flex": ladder(price.flex.as_ref()),
        "priority": ladder(price.priority.as_ref()),
        "batch": ladder(price.batch.as_ref()),
        "max_output_tokens": price.max_output_tokens,
    })
}

/// Per-million rates as JSON numbers.
pub fn rates_json(rates: &Rates) -> serde_json::Value {
    let [input, output, cached, write, write_1h] = rates.usd_per_million();
    serde_json::json!({
        "input_per_million": input,
        "output_per_million": output,
        "cached_input_per_million": cached,
        "cache_write_per_million": write,
        "cache_write_1h_per_million": write_1h,
    })
}

/// Downloads the price map at `url`, checks it (a price map, and unless `force` at least half
/// as many models as the prices in use), keeps the previous copy beside it, writes it where the
/// proxy reads it at start and on SIGHUP, and says what changed.
pub fn update(config: &Config, url: &str, force: bool) -> Result<String, CommandError> {
    let target = config.pricing.downloaded.clone().ok_or_else(|| {
        CommandError::Prices(
            "no data directory is known (give --data-dir, or set HOME or XDG_DATA_HOME)".into(),
        )
    })?;
    let body = download(config, url)?;
    let map = litellm::parse(&body)
        .map_err(|e| CommandError::Prices(format!("{url} is not usable: {e}")))?;
    let before = previous_map(&target);
    let known = before.as_ref().map_or(0, |b| b.models.len());
    if !force && map.models.len() * 2 < known {
        return Err(CommandError::Prices(format!(
            "{url} lists {} models, the prices in use {known}: not saved (a truncated or wrong file?); --force saves it anyway",
            map.models.len()
        )));
    }
    let previous = save(&target, &body)?;
    let mut out = String::new();
    let _ = writeln!(out, "{}", changes(before.as_ref(), &map));
    if map.refused > 0 {
        let _ = writeln!(
            out,
            "{} entries refused and left out: {}",
            map.refused,
            map.problems.join("; ")
        );
    }
    let _ = writeln!(out, "Saved {} from {url}.", target.display());
    if let Some(previous) = previous {
        let _ = writeln!(out, "The previous copy is {}.", previous.display());
    }
    out.push_str(
        "A running llm-meter takes the new prices on SIGHUP (kill -HUP <pid>) or when restarted.\n",
    );
    Ok(out)
}

/// The prices the proxy read before this update: the last download, else the built-in table.
fn previous_map(target: &Path) -> Option<PriceMap> {
    load::read_map(target)
        .ok()
        .or_else(|| litellm::parse(crate::meter::pricing::BUILTIN_MAP.as_bytes()).ok())
}

/// `312 models, 7 prices changed: gpt-4o input 2.5 -> 2, …; 3 added, 1 no longer listed` (a
/// model no longer listed keeps the price of the sources below: the built-in table's).
fn changes(before: Option<&PriceMap>, after: &PriceMap) -> String {
    let mut line = format!("{} models", after.models.len());
    let Some(before) = before else {
        return line;
    };
    let mut changed = Vec::new();
    for (name, entry) in &after.models {
        if let Some(old) = before.models.get(name)
            && old.price != entry.price
        {
            changed.push(change_text(name, &old.price, &entry.price));
        }
    }
    let added = after
        .models
        .keys()
        .filter(|name| !before.models.contains_key(*name))
        .count();
    let removed = before
        .models
        .keys()
        .filter(|name| !after.models.contains_key(*name))
        .count();
    let plural = if changed.len() == 1 { "" } else { "s" };
    let _ = write!(line, ", {} price{plural} changed", changed.len());
    if !changed.is_empty() {
        let shown: Vec<_> = changed.iter().take(CHANGES_SHOWN).cloned().collect();
        let _ = write!(line, ": {}", shown.join("; "));
        if changed.len() > CHANGES_SHOWN {
            let _ = write!(line, "; and {} more", changed.len() - CHANGES_SHOWN);
        }
    }
    let _ = write!(line, "; {added} added, {removed} no longer listed");
    line
}

fn change_text(name: &str, old: &Price, new: &Price) -> String {
    let names = [
        "input",
        "output",
        "cache read",
        "cache write",
        "1h cache write",
    ];
    let (old_rates, new_rates) = (
        old.standard.base.usd_per_million(),
        new.standard.base.usd_per_million(),
    );
    let parts: Vec<String> = names
        .iter()
        .zip(old_rates.iter().zip(new_rates.iter()))
        .filter(|(_, (a, b))| a != b)
        .map(|(class, (a, b))| format!("{class} {a} -> {b}"))
        .collect();
    if parts.is_empty() {
        format!("{name} (tiers or long-context rates)")
    } else {
        format!("{name} {}", parts.join(", "))
    }
}

/// Writes `body` to `target` through a temporary file flushed to disk and renamed over it, so
/// a reload or restart at any moment reads the old file or the new one whole; the old one is
/// kept as `prices.json.previous`. Returns that copy's path when there was one.
fn save(target: &Path, body: &[u8]) -> Result<Option<PathBuf>, CommandError> {
    use std::io::Write as _;
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        CommandError::Prices(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, e))?;
    }
    let temporary = target.with_extension(format!("json.{}.download", std::process::id()));
    let saved = (|| {
        let mut file =
            std::fs::File::create(&temporary).map_err(|e| fail("write", &temporary, e))?;
        file.write_all(body)
            .and_then(|()| file.sync_all())
            .map_err(|e| fail("write", &temporary, e))?;
        let previous = target.with_extension("json.previous");
        let kept = if target.exists() {
            // A copy, not a move: the current file stays in place until the rename replaces it.
            std::fs::copy(target, &previous).map_err(|e| fail("keep a copy of", target, e))?;
            Some(previous)
        } else {
            None
        };
        std::fs::rename(&temporary, target).map_err(|e| fail("write", target, e))?;
        Ok(kept)
    })();
    if saved.is_err() {
        // Nothing half-written is left behind.
        let _ = std::fs::remove_file(&temporary);
    }
    saved
}

/// GETs `url` through the egress rules (proxy, trusted CAs) upstreams use; at most
/// `litellm::MAX_BYTES`.
fn download(config: &Config, url: &str) -> Result<Vec<u8>, CommandError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| CommandError::Prices(format!("--url {url:?}: {e}")))?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(CommandError::Prices(format!(
            "--url {url:?} must be an absolute http(s) URL"
        )));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CommandError::Prices(format!("cannot start the download: {e}")))?;
    runtime.block_on(async {
        let dialer = crate::app::dialer_for(config, &scheme, &authority)
            .map_err(|e| CommandError::Prices(e.to_string()))?;
        let request = http::Request::get(uri)
            .header(
                http::header::USER_AGENT,
                concat!("llm-meter/", env!("CARGO_PKG_VERSION")),
            )
            .body(axum::body::Body::empty())
            .map_err(|e| CommandError::Prices(e.to_string()))?;
        let fetch = async {
            let response = crate::client::send_once(&dialer, request)
                .await
                .map_err(|e| CommandError::Prices(format!("cannot download {url}: {e}")))?;
            let status = response.status();
            if !status.is_success() {
                return Err(CommandError::Prices(format!("{url} answered {status}")));
            }
            let limited = http_body_util::Limited::new(
                response.into_body(),
                usize::try_from(litellm::MAX_BYTES).unwrap_or(usize::MAX),
            );
            let body = limited.collect().await.map_err(|e| {
                CommandError::Prices(format!("cannot read {url} (over 64 MiB?): {e}"))
            })?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(DOWNLOAD_TIMEOUT, fetch)
            .await
            .map_err(|_| CommandError::Prices(format!("{url}: no whole answer in 120 s")))?
    })
}
