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
    /// With replicas: this one's share of what is left.
    share: Option<Share>,
}

/// The part of a shared bucket one replica may use until the next sync: what is left divided
/// among the replicas using the key, refilled at their share of the rate. The shares add up
/// to the bucket, so replicas admitting at once between two syncs never take more than it
/// holds.
#[derive(Debug, Clone, Copy)]
struct Share {
    level: f64,
    replicas: f64,
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
            share: None,
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
            if let Some(share) = &mut self.share {
                let rate = self.per_minute / share.replicas;
                share.level = (share.level + elapsed * rate).min(rate);
            }
            self.at = now;
        }
    }

    /// What may be used locally: the bucket, or this replica's share of it.
    fn usable(&self) -> f64 {
        self.share
            .map_or(self.level, |share| share.level.min(self.level))
    }

    fn take(&mut self, n: f64) {
        self.level -= n;
        if let Some(share) = &mut self.share {
            share.level -= n;
        }
    }

    /// Takes what other replicas used since the last sync, and divides what is left among the
    /// `replicas` sharing the key (this one counted); one replica takes all.
    ///
    /// While another replica is taking (`others_busy`), what this one sees is behind by what
    /// that one took since it last said: the share then only shrinks to the fair part of what
    /// is seen, and grows only by its refill. Once the others are idle, the view is whole and
    /// the share is reset to the fair part, so a replica busy alone reaches the whole rate.
    pub fn sync(&mut self, used_elsewhere: u64, replicas: u32, others_busy: bool, now: i64) {
        self.refill(now);
        #[expect(
            clippy::cast_precision_loss,
            reason = "counts are far below 2^52 per minute"
        )]
        let used = used_elsewhere as f64;
        self.level -= used;
        let fair = self.level.max(0.0) / f64::from(replicas);
        self.share = (replicas > 1).then(|| Share {
            level: match self.share {
                Some(share) if others_busy => share.level.min(fair),
                _ => fair,
            },
            replicas: f64::from(replicas),
        });
    }

    /// How long until `level` reaches `needed`, at the refill rate.
    fn wait_for(&self, needed: f64) -> Duration {
        let (level, rate) = match self.share {
            Some(share) if share.level < self.level => {
                (share.level, self.per_minute / share.replicas)
            }
            _ => (self.level, self.per_minute),
        };
        let missing = (needed - level).max(0.0);
        Duration::from_secs_f64(missing / rate * 60.0)
    }

    /// Takes one (a request) if there is one; else how long until there is.
    pub fn take_one(&mut self, now: i64) -> Result<(), Duration> {
        self.refill(now);
        if self.usable() >= 1.0 {
            self.take(1.0);
            Ok(())
        } else {
            Err(self.wait_for(1.0))
        }
    }

    /// Admits while the bucket is not in debt; else how long until it is not.
    pub fn check(&mut self, now: i64) -> Result<(), Duration> {
        self.refill(now);
        if self.usable() > 0.0 {
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
        self.take(n);
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
    fn replicas_sharing_a_bucket_each_take_their_share_of_what_is_left() {
        // Three replicas, each with a full bucket of 60: together they may not take 180.
        let mut buckets = [Bucket::new(60, 0); 3];
        for bucket in &mut buckets {
            bucket.sync(0, 3, false, 0);
        }
        let taken: usize = buckets
            .iter_mut()
            .map(|b| (0..100).filter(|_| b.take_one(0).is_ok()).count())
            .sum();
        assert_eq!(taken, 60);
        // A sync that has not yet heard of the others' 40 gives nothing more while they are busy.
        buckets[0].sync(0, 3, true, 0);
        assert!(buckets[0].take_one(0).is_err());
        // At the next sync each learns of the others' 40: nothing is left.
        for bucket in &mut buckets {
            bucket.sync(40, 3, true, 0);
            assert!(bucket.take_one(0).is_err());
        }
        // Alone again, one replica has the whole rate: one a second.
        buckets[0].sync(0, 1, false, SECOND);
        buckets[0].take_one(SECOND).unwrap();
        assert!(buckets[0].take_one(SECOND).is_err());
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
