//! Time for budgets and rate limits: a replaceable clock, and the calendar periods (hour, day,
//! month in the configured time zone) that spend is counted in.

use std::sync::atomic::{AtomicI64, Ordering};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Where budgets and rate limits read the time; tests move it by hand.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that is the system clock moved by an offset, for tests of period changes.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    offset_us: AtomicI64,
}

impl ShiftedClock {
    /// Moves the clock forward by `seconds`.
    pub fn advance(&self, seconds: i64) {
        self.offset_us
            .fetch_add(seconds.saturating_mul(1_000_000), Ordering::Relaxed);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> Timestamp {
        let us = Timestamp::now()
            .as_microsecond()
            .saturating_add(self.offset_us.load(Ordering::Relaxed));
        Timestamp::from_microsecond(us).unwrap_or(Timestamp::MAX)
    }
}

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A calendar day in the budget time zone.
    Daily,
    /// A calendar month in the budget time zone.
    Monthly,
    /// Since the beginning of the ledger.
    Total,
}

impl Period {
    /// Every period, in the order they are shown.
    pub const ALL: [Self; 3] = [Self::Daily, Self::Monthly, Self::Total];

    /// The name used in config (`daily_usd`), JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
            Self::Total => "total",
        }
    }
}

/// A span of time `[start, end)` in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First microsecond.
    pub start: i64,
    /// First microsecond after it.
    pub end: i64,
}

impl Window {
    /// The window that always holds: the `Total` period.
    pub const FOREVER: Self = Self {
        start: i64::MIN,
        end: i64::MAX,
    };

    /// True when `at` (µs) falls in the window.
    pub fn contains(self, at: i64) -> bool {
        self.start <= at && at < self.end
    }
}

/// The window of `period` that holds `now`, in time zone `tz`.
pub fn window(period: Period, now: Timestamp, tz: &TimeZone) -> Window {
    let date = now.to_zoned_datetime(tz.clone()).date();
    let (first, next) = match period {
        Period::Total => return Window::FOREVER,
        Period::Daily => (date, date.tomorrow()),
        Period::Monthly => (date.first_of_month(), date.last_of_month().tomorrow()),
    };
    let start_of = |d: jiff::civil::Date| {
        d.to_zoned_datetime(tz.clone())
            .map(|z| z.timestamp().as_microsecond())
    };
    match (start_of(first), next.map(start_of)) {
        (Ok(start), Ok(Ok(end))) => Window { start, end },
        // Only at the ends of the representable calendar (year 9999): count it as forever.
        _ => Window::FOREVER,
    }
}

/// The clock hour that holds `now` (for the hourly-spend anomaly).
pub fn hour(now: Timestamp) -> Window {
    const HOUR: i64 = 3_600_000_000;
    let start = now.as_microsecond().div_euclid(HOUR) * HOUR;
    Window {
        start,
        end: start + HOUR,
    }
}

/// A time in µs as RFC 3339 UTC.
pub fn rfc3339(at_us: i64) -> String {
    Timestamp::from_microsecond(at_us).map_or_else(|_| "never".to_owned(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn days_and_months_follow_the_time_zone() {
        let utc = TimeZone::UTC;
        let day = window(Period::Daily, at("2026-11-25T23:30:00Z"), &utc);
        assert_eq!(rfc3339(day.start), "2026-11-25T00:00:00Z");
        assert_eq!(rfc3339(day.end), "2026-11-26T00:00:00Z");
        // 23:30 UTC is already the 26th in Paris (UTC+1 in November).
        let paris = TimeZone::get("Europe/Paris").unwrap();
        let day = window(Period::Daily, at("2026-11-25T23:30:00Z"), &paris);
        assert_eq!(rfc3339(day.start), "2026-11-25T23:00:00Z");
        let month = window(Period::Monthly, at("2026-02-10T12:00:00Z"), &utc);
        assert_eq!(rfc3339(month.start), "2026-02-01T00:00:00Z");
        assert_eq!(rfc3339(month.end), "2026-03-01T00:00:00Z");
        let december = window(Period::Monthly, at("2026-12-31T12:00:00Z"), &utc);
        assert_eq!(rfc3339(december.end), "2027-01-01T00:00:00Z");
        assert_eq!(
            window(Period::Total, at("2026-01-01T00:00:00Z"), &utc),
            Window::FOREVER
        );
    }

    #[test]
    fn a_shifted_clock_moves_forward() {
        let clock = ShiftedClock::default();
        let before = clock.now();
        clock.advance(86_400);
        assert!(clock.now().as_second() - before.as_second() >= 86_400);
    }
}
