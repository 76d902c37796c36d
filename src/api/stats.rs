//! The `/stats` views: JSON for machines, one line per key for people. Nothing secret is in either.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::ser::Error as _;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;

use crate::guard::{BudgetLine, GuardView};
use crate::meter::ledger::Health;
use crate::meter::pricing::NanoUsd;
use crate::meter::{Counts, Snapshot};
use time::OffsetDateTime;

/// The counters as `/stats` shows them.
#[derive(Debug, Serialize)]
pub struct CountsView {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    cached_tokens: u64,
    cache_write_tokens: u64,
    /// The part of `cache_write_tokens` written for an hour (Anthropic's 1-hour cache TTL).
    cache_write_1h_tokens: u64,
    reasoning_tokens: u64,
    #[serde(serialize_with = "serialize_usd")]
    cost_usd: NanoUsd,
    /// The exact cost; `cost_usd` is this divided by 10^9.
    cost_nano_usd: u64,
    unpriced_requests: u64,
    /// Requests whose tokens a tokenizer counted because the provider reported none.
    estimated_requests: u64,
}

impl From<&Counts> for CountsView {
    fn from(c: &Counts) -> Self {
        Self {
            requests: c.requests,
            errors: c.errors,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            total_tokens: c.total_tokens,
            cached_tokens: c.cached_tokens,
            cache_write_tokens: c.cache_write_tokens,
            cache_write_1h_tokens: c.cache_write_1h_tokens,
            reasoning_tokens: c.reasoning_tokens,
            cost_usd: c.cost,
            cost_nano_usd: c.cost.0,
            unpriced_requests: c.unpriced_requests,
            estimated_requests: c.estimated_requests,
        }
    }
}

#[derive(Debug, Serialize)]
struct KeyView<'a> {
    key: &'a str,
    id: &'a str,
    #[serde(flatten)]
    counts: CountsView,
    /// A named key's budgets, with their spend in the current periods.
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<&'a [BudgetLine]>,
    models: BTreeMap<&'a str, CountsView>,
}

/// The global budget in `/stats`.
#[derive(Debug, Serialize)]
struct GlobalBudgetView<'a> {
    timezone: &'a str,
    lines: &'a [BudgetLine],
}

/// The ledger's state in `/stats`.
#[derive(Debug, Serialize)]
struct LedgerView<'a> {
    path: String,
    /// Rows recorded but not yet on disk (a growing number means a slow or failing disk).
    pending_rows: u64,
    written_rows: u64,
    /// Rows given up because the disk kept failing and the backlog bound was reached.
    lost_rows: u64,
    failing: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    /// The corruption check run at start: `checking`, `ok` or `failed: …`.
    integrity: String,
    /// With a PostgreSQL ledger: the sync of budgets, limits and alerts with other replicas.
    #[serde(skip_serializing_if = "Option::is_none")]
    shared: Option<SharedView>,
}

/// The sync with other replicas in `/stats`.
#[derive(Debug, Serialize)]
struct SharedView {
    /// This replica's id, as its rows in the database carry it (hex).
    replica: String,
    /// Milliseconds since the last sync that succeeded (they run every 100 ms).
    last_sync_ms: Option<u64>,
    /// Why the last sync failed, while it fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The whole `/stats` JSON document.
#[derive(Debug, Serialize)]
pub struct StatsView<'a> {
    since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
    totals: CountsView,
    /// Keys in the totals; `keys` lists fewer when `?limit=` or `?key=` asked for fewer.
    keys_total: usize,
    keys: Vec<KeyView<'a>>,
    /// The budget of all keys together, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<GlobalBudgetView<'a>>,
    /// Every key summed per upstream: what each provider (or local server) was sent.
    by_upstream: BTreeMap<&'a str, CountsView>,
    /// Absent for history ranges; `null` when persistence is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    ledger: Option<Option<LedgerView<'a>>>,
}

impl<'a> StatsView<'a> {
    /// Says how many keys the totals count, when `keys` lists only some.
    pub fn keys_total(mut self, keys_total: usize) -> Self {
        self.keys_total = keys_total;
        self
    }

    /// Builds the JSON view of a snapshot.
    pub fn new(snapshot: &'a Snapshot) -> Self {
        Self {
            since: rfc3339(snapshot.since),
            until: None,
            ledger: None,
            budget: None,
            totals: CountsView::from(&snapshot.totals),
            keys_total: snapshot.keys.len(),
            by_upstream: snapshot
                .upstreams
                .iter()
                .map(|(name, counts)| (name.as_str(), CountsView::from(counts)))
                .collect(),
            keys: snapshot
                .keys
                .iter()
                .map(|k| KeyView {
                    key: &k.identity.label,
                    id: &k.identity.id,
                    counts: CountsView::from(&k.totals),
                    budget: None,
                    models: k
                        .models
                        .iter()
                        .map(|(model, counts)| (model.as_str(), CountsView::from(counts)))
                        .collect(),
                })
                .collect(),
        }
    }
}

impl<'a> StatsView<'a> {
    /// Marks the view as a history range ending at `until`.
    #[must_use]
    pub fn until(mut self, until: Option<OffsetDateTime>) -> Self {
        self.until = until.map(rfc3339);
        self
    }

    /// Adds the budgets: the global one, and each named key's beside its totals.
    #[must_use]
    pub fn budgets(mut self, guard: Option<&'a GuardView>) -> Self {
        let Some(guard) = guard else { return self };
        if !guard.global.is_empty() {
            self.budget = Some(GlobalBudgetView {
                timezone: &guard.timezone,
                lines: &guard.global,
            });
        }
        for key in &mut self.keys {
            key.budget = guard
                .keys
                .iter()
                .find(|named| named.id == key.id && !named.budget.is_empty())
                .map(|named| named.budget.as_slice());
        }
        self
    }

    /// Adds the ledger's state (`null` when there is none) to a view of the live totals.
    #[must_use]
    pub fn ledger(mut self, health: Option<&'a Health>) -> Self {
        if self.until.is_none() {
            self.ledger = Some(health.map(|h| LedgerView {
                path: h.path.display().to_string(),
                pending_rows: h.pending_rows,
                written_rows: h.written_rows,
                lost_rows: h.lost_rows,
                failing: h.is_failing,
                last_error: h.last_error.as_deref(),
                integrity: h.integrity.to_string(),
                shared: None,
            }));
        }
        self
    }

    /// Adds the sync with other replicas to the ledger's state, when there is one.
    #[must_use]
    pub fn shared(mut self, status: Option<crate::cluster::Status>) -> Self {
        if let (Some(Some(ledger)), Some(status)) = (&mut self.ledger, status) {
            ledger.shared = Some(SharedView {
                replica: status.replica,
                last_sync_ms: status.last_sync_ms,
                error: status.error,
            });
        }
        self
    }
}

/// Writes a cost in dollars as a plain JSON number, exact to the nano-dollar (`0.00000795`,
/// `0.0122`, `3.0`), where an `f64` would be written `7.95e-6`; it reads back as the same `f64`.
pub fn serialize_usd<S: Serializer>(cost: &NanoUsd, serializer: S) -> Result<S::Ok, S::Error> {
    let fraction = format!("{:09}", cost.0 % 1_000_000_000);
    let fraction = match fraction.trim_end_matches('0') {
        "" => "0",
        digits => digits,
    };
    let number = format!("{}.{fraction}", cost.0 / 1_000_000_000);
    RawValue::from_string(number)
        .map_err(S::Error::custom)?
        .serialize(serializer)
}

/// A time as RFC 3339 (`2026-11-25T09:00:00.123456Z`), as every view shows times.
pub fn rfc3339(at: OffsetDateTime) -> String {
    // Formatting fails only outside years 0-9999, which no clock here produces.
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Nano-dollars of an amount shown in dollars (`as` saturates: 0 below zero, `u64::MAX` past it).
fn nano_of(usd: f64) -> NanoUsd {
    NanoUsd((usd * 1e9).round() as u64)
}

/// A count and its noun, in the singular for one: `1 request`, `0 requests`, `2 errors`.
pub fn count(n: u64, noun: &str) -> String {
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {noun}{plural}")
}

/// One line of counters: `12 requests, 1 error | tokens: 1234 in + 567 out | cost: $0.0122`.
pub fn summary_line(c: &Counts) -> String {
    let mut line = format!(
        "{}, {} | tokens: {} in + {} out | cost: {}",
        count(c.requests, "request"),
        count(c.errors, "error"),
        c.prompt_tokens,
        c.completion_tokens,
        cost(c)
    );
    if c.estimated_requests > 0 {
        let _ = write!(line, " ({} estimated)", c.estimated_requests);
    }
    line
}

/// A cost as text views write it: `$0.0122`; with unpriced requests in it, what is known and
/// that the rest is not, never a bare `$0.00`: `unknown (3 unpriced requests)`, or
/// `$0.0122 + unknown (3 unpriced requests)`.
pub fn cost(c: &Counts) -> String {
    let unknown = format!(
        "unknown ({})",
        count(c.unpriced_requests, "unpriced request")
    );
    match (c.unpriced_requests, c.cost.0) {
        (0, _) => c.cost.to_string(),
        (_, 0) => unknown,
        _ => format!("{} + {unknown}", c.cost),
    }
}

/// The text view: one line per key (with what is left of a named key's budgets), then the totals.
pub fn text(snapshot: &Snapshot, guard: Option<&GuardView>) -> String {
    let mut out = String::new();
    for key in &snapshot.keys {
        let budget = guard
            .and_then(|g| g.keys.iter().find(|k| k.id == key.identity.id))
            .map(|k| remaining(&k.budget))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} [{}]: {}{budget}",
            key.identity.label,
            key.identity.id,
            summary_line(&key.totals)
        );
    }
    let budget = guard.map(|g| remaining(&g.global)).unwrap_or_default();
    let _ = writeln!(
        out,
        "total since {}: {}{budget}",
        rfc3339(snapshot.since),
        summary_line(&snapshot.totals)
    );
    out
}

/// ` | budget left: daily $0.75 of $1.00, monthly …`, or nothing without budgets.
fn remaining(lines: &[BudgetLine]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{} {} of {}",
                l.period,
                nano_of(l.remaining_usd),
                nano_of(l.limit_usd)
            )
        })
        .collect();
    format!(" | budget left: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Identity;
    use crate::meter::KeySnapshot;
    use crate::money::NanoUsd;

    fn snapshot() -> Snapshot {
        let counts = Counts {
            requests: 2,
            prompt_tokens: 1234,
            completion_tokens: 567,
            total_tokens: 1801,
            cost: NanoUsd(12_200_000),
            ..Counts::default()
        };
        Snapshot {
            since: time::OffsetDateTime::UNIX_EPOCH,
            totals: counts,
            keys: vec![KeySnapshot {
                identity: Identity::from_key(b"sk-proj-abcdefghijklmnopqrstuvwxyz"),
                totals: counts,
                models: BTreeMap::from([("gpt-4o".to_owned(), counts)]),
            }],
            upstreams: BTreeMap::from([("openai".to_owned(), counts)]),
        }
    }

    #[test]
    fn costs_have_four_significant_digits_and_at_least_two_decimals() {
        for (nano, text) in [
            (0, "$0.00"),
            (1, "$0.000000001"),
            (7_950, "$0.00000795"),
            (57_500, "$0.0000575"),
            (68_000, "$0.000068"),
            (99_995, "$0.0001"),
            (408_600, "$0.0004086"),
            (417_500, "$0.0004175"),
            (417_549, "$0.0004175"),
            (417_550, "$0.0004176"),
            (9_000_000, "$0.009"),
            (12_200_000, "$0.0122"),
            (750_000_000, "$0.75"),
            (999_950_000, "$1.00"),
            (1_000_000_000, "$1.00"),
            (1_234_500_000, "$1.235"),
            (123_456_789_000, "$123.46"),
            (u64::MAX, "$18446744073.71"),
        ] {
            assert_eq!(NanoUsd(nano).to_string(), text, "{nano}");
        }
    }

    #[test]
    fn json_costs_are_plain_decimals_exact_to_the_nano_dollar() {
        for (nano, json) in [
            (0, "0.0"),
            (1, "0.000000001"),
            (7_950, "0.00000795"),
            (12_200_000, "0.0122"),
            (3_000_000_000, "3.0"),
            (u64::MAX, "18446744073.709551615"),
        ] {
            let mut written = Vec::new();
            serialize_usd(
                &NanoUsd(nano),
                &mut serde_json::Serializer::new(&mut written),
            )
            .unwrap();
            assert_eq!(String::from_utf8(written).unwrap(), json);
        }
    }

    #[test]
    fn counts_of_one_are_singular() {
        assert_eq!(count(0, "request"), "0 requests");
        assert_eq!(count(1, "request"), "1 request");
        assert_eq!(count(2, "unpriced request"), "2 unpriced requests");
    }

    #[test]
    fn unpriced_spend_is_written_unknown_never_a_bare_zero() {
        let priced = Counts {
            cost: NanoUsd(12_200_000),
            ..Counts::default()
        };
        assert_eq!(cost(&priced), "$0.0122");
        assert_eq!(cost(&Counts::default()), "$0.00");
        let all_unpriced = Counts {
            unpriced_requests: 3,
            ..Counts::default()
        };
        assert_eq!(cost(&all_unpriced), "unknown (3 unpriced requests)");
        let mixed = Counts {
            unpriced_requests: 1,
            ..priced
        };
        assert_eq!(cost(&mixed), "$0.0122 + unknown (1 unpriced request)");
        let line = summary_line(&Counts {
            estimated_requests: 2,
            ..mixed
        });
        assert!(
            line.ends_with("| cost: $0.0122 + unknown (1 unpriced request) (2 estimated)"),
            "{line}"
        );
    }

    #[test]
    fn text_view_has_one_line_per_key_and_a_total() {
        let text = text(&snapshot(), None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("sk-proj-…wxyz ["), "{}", lines[0]);
        assert!(
            lines[0].ends_with("tokens: 1234 in + 567 out | cost: $0.0122"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("total since 1970-01-01T00:00:00Z: 2 requests"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn json_view_has_the_documented_shape() {
        let snap = snapshot();
        let json = serde_json::to_value(StatsView::new(&snap)).unwrap();
        assert_eq!(json["since"], "1970-01-01T00:00:00Z");
        assert_eq!(json["totals"]["cost_usd"], 0.0122);
        let key = &json["keys"][0];
        assert_eq!(key["key"], "sk-proj-…wxyz");
        assert_eq!(key["requests"], 2);
        assert_eq!(key["models"]["gpt-4o"]["prompt_tokens"], 1234);
        assert_eq!(key["models"]["gpt-4o"]["cost_nano_usd"], 12_200_000);
    }
}
