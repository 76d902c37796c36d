//! Unpriced models made loud: the first request of a model no price covers, on an upstream,
//! raises an alert, once per UTC day, within a bounded set of the names alerted.

use std::collections::HashSet;

use parking_lot::Mutex;

use super::alerts::Alert;

/// The alert kind of a model with no price.
pub const MODEL_KIND: &str = "unpriced_model";
/// The alert kind of a priced model whose response had audio tokens, which no price covers.
pub const AUDIO_KIND: &str = "unpriced_audio";

/// (upstream, model, part) triples alerted per UTC day. Model names come from clients: past
/// this many in one day, a new one raises no alert (its requests are still counted in
/// `unpriced_requests`) and one warning says so, until the day ends.
pub const PER_DAY: usize = 4096;

/// What part of a request had no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The model itself: its tokens are counted, its cost is not.
    Model,
    /// Its audio tokens: the model's price covers the text tokens only.
    Audio,
}

/// Seconds in a UTC day: days are counted from the Unix epoch, which starts one.
const DAY: i64 = 86_400;

/// The names alerted today.
#[derive(Debug, Default)]
pub(super) struct Seen {
    today: Mutex<Today>,
}

#[derive(Debug, Default)]
struct Today {
    /// Days since the Unix epoch.
    day: i64,
    alerted: HashSet<(Box<str>, Box<str>, Part)>,
    /// The set reached `PER_DAY` today and a warning said so.
    is_full: bool,
}

impl Seen {
    /// True the first time today (UTC, as of `now`) that `part` of `model` on `upstream` was
    /// unpriced, while today's set has room.
    pub(super) fn is_first_today(
        &self,
        now: jiff::Timestamp,
        upstream: &str,
        model: &str,
        part: Part,
    ) -> bool {
        let day = now.as_second().div_euclid(DAY);
        let mut today = self.today.lock();
        if today.day != day {
            *today = Today {
                day,
                ..Today::default()
            };
        }
        let key = (upstream.into(), model.into(), part);
        if today.alerted.contains(&key) {
            return false;
        }
        if today.alerted.len() >= PER_DAY {
            if !std::mem::replace(&mut today.is_full, true) {
                drop(today);
                tracing::warn!(
                    "{PER_DAY} unpriced models were alerted today: the others raise no alert until midnight UTC (their requests are still counted in unpriced_requests)"
                );
            }
            return false;
        }
        today.alerted.insert(key);
        true
    }
}

/// The alert of `part` of `model` on `upstream` having no price. Names are quoted as Rust
/// writes strings, so a name a client chose cannot break the log line or the chat message.
pub(super) fn alert(now: jiff::Timestamp, upstream: &str, model: &str, part: Part) -> Alert {
    let (kind, message) = match part {
        Part::Model => (
            MODEL_KIND,
            format!(
                "model {model:?} (upstream {upstream:?}) has no price: its tokens are counted, its cost is not; give it one with [pricing.{model:?}] in proxy.toml, a pricing_file, or `llm-meter prices update`"
            ),
        ),
        Part::Audio => (
            AUDIO_KIND,
            format!(
                "model {model:?} (upstream {upstream:?}) answered with audio tokens, which no price covers: they are counted as tokens and left out of the cost, and the request is counted as unpriced"
            ),
        ),
    };
    let day = now.as_second().div_euclid(86_400);
    Alert {
        upstream: Some(upstream.to_owned()),
        dedupe: Some(format!("{kind}/{day}/{upstream}/{model}")),
        ..Alert::new(now, kind, model, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn each_name_and_part_is_first_once_per_utc_day() {
        let seen = Seen::default();
        let noon = 20_000 * DAY + DAY / 2;
        assert!(seen.is_first_today(at(noon), "openai", "m", Part::Model));
        assert!(!seen.is_first_today(at(noon + 60), "openai", "m", Part::Model));
        assert!(seen.is_first_today(at(noon), "openai", "m", Part::Audio));
        assert!(seen.is_first_today(at(noon), "local", "m", Part::Model));
        assert!(seen.is_first_today(at(noon), "openai", "n", Part::Model));
        // One second before midnight UTC is the same day; midnight is the next.
        assert!(!seen.is_first_today(at(noon + DAY / 2 - 1), "openai", "m", Part::Model));
        assert!(seen.is_first_today(at(noon + DAY / 2), "openai", "m", Part::Model));
    }

    #[test]
    fn past_the_cap_new_names_are_not_alerted_until_the_next_day() {
        let seen = Seen::default();
        let day = 20_000 * DAY;
        for i in 0..PER_DAY {
            assert!(seen.is_first_today(at(day), "u", &format!("m{i}"), Part::Model));
        }
        assert!(!seen.is_first_today(at(day), "u", "one-more", Part::Model));
        assert!(!seen.is_first_today(at(day), "u", "m0", Part::Model));
        assert!(seen.is_first_today(at(day + DAY), "u", "one-more", Part::Model));
    }

    #[test]
    fn the_alert_names_the_model_and_how_to_price_it() {
        let a = alert(at(0), "openai", "no-such-model", Part::Model);
        assert_eq!(a.kind, "unpriced_model");
        assert_eq!(a.scope, "no-such-model");
        assert_eq!(a.upstream.as_deref(), Some("openai"));
        assert!(
            a.message
                .starts_with("model \"no-such-model\" (upstream \"openai\") has no price"),
            "{}",
            a.message
        );
        assert!(
            a.message
                .contains("[pricing.\"no-such-model\"] in proxy.toml"),
            "{}",
            a.message
        );
        let audio = alert(at(0), "openai", "gpt-realtime", Part::Audio);
        assert_eq!(audio.kind, "unpriced_audio");
        assert!(audio.message.contains("audio tokens"), "{}", audio.message);
    }

    #[test]
    fn a_name_with_a_line_break_stays_on_one_line() {
        let a = alert(at(0), "openai", "evil\nalert: forged", Part::Model);
        assert!(!a.message.contains('\n'), "{}", a.message);
    }
}
