//! Per-minute rate limits as token buckets: a bucket holds up to a minute's allowance and
//! refills continuously, so a key may burst its whole minute at once, then goes at the rate.

use std::time::Duration;

/// One bucket of a per-minute allowance.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    per_minute: f64,
    level: f64,
    /// When `level` was last brought up to date (µs).
    at: i64,
}

impl Bucket {
    /// A full bucket of `per_minute`.
    pub fn new(per_minute: u64, now: i64) -> Self {
        #[expect(
            clippy::cast_precision_loss,
            reason = "limits are far below 2^52 per minute"
        )]
        let per_minute = per_minute as f64;
        Self {
            per_minute,
            level: per_minute,
            at: now,
        }
    }

    fn refill(&mut self, now: i64) {
        if now > self.at {
            #[expect(
                clippy::cast_precision_loss,
                reason = "elapsed microseconds are far below 2^52"
            )]
            let elapsed = (now - self.at) as f64 / 60_000_000.0;
            self.level = (self.level + elapsed * self.per_minute).min(self.per_minute);
            self.at = now;
        }
    }

    /// How long until `level` reaches `needed`, at the refill rate.
    fn wait_for(&self, needed: f64) -> Duration {
        let missing = (needed - self.level).max(0.0);
        Duration::from_secs_f64(missing / self.per_minute * 60.0)
    }

    /// Takes one (a request) if there is one; else how long until there is.
    pub fn take_one(&mut self, now: i64) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= 1.0 {
            self.level -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for(1.0))
        }
    }

    /// Admits while the bucket is not in debt; else how long until it is not.
    pub fn check(&mut self, now: i64) -> Result<(), Duration> {
        self.refill(now);
        if self.level > 0.0 {
            Ok(())
        } else {
            // Strictly positive again: a hair past the exact time.
            Err(self.wait_for(0.0) + Duration::from_millis(1))
        }
    }

    /// Takes `n` (tokens actually used), going into debt if need be: a request's tokens are
    /// known only once it has been answered.
    pub fn spend(&mut self, n: u64, now: i64) {
        self.refill(now);
        #[expect(
            clippy::cast_precision_loss,
            reason = "token counts are far below 2^52"
        )]
        let n = n as f64;
        self.level -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn requests_burst_a_minute_then_refill_at_the_rate() {
        let mut bucket = Bucket::new(60, 0);
        for _ in 0..60 {
            bucket.take_one(0).unwrap();
        }
        let wait = bucket.take_one(0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // One second later, one more request.
        bucket.take_one(SECOND).unwrap();
        assert!(bucket.take_one(SECOND).is_err());
    }

    #[test]
    fn tokens_may_go_into_debt_and_admit_again_once_repaid() {
        let mut bucket = Bucket::new(1_000, 0);
        bucket.check(0).unwrap();
        bucket.spend(1_500, 0);
        let wait = bucket.check(0).unwrap_err();
        // 500 tokens of debt at 1,000 a minute: 30 s.
        assert!(
            wait >= Duration::from_secs(30) && wait < Duration::from_secs(31),
            "{wait:?}"
        );
        assert!(bucket.check(29 * SECOND).is_err());
        bucket.check(31 * SECOND).unwrap();
    }
}
