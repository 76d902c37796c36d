-- The ledger's first schema on PostgreSQL. Times are unix microseconds (BIGINT), as in SQLite.

-- One row per metered request. (at, replica) is unique: each replica makes its rows' times
-- strictly increasing. The key leads with the time, so it also serves ranges of rows (exports,
-- filters on user, session or tags, the ends of a range): one index to keep up, not two.
CREATE TABLE requests (
    replica BIGINT NOT NULL,
    at BIGINT NOT NULL,
    period BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    key_label TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    flavor TEXT NOT NULL,
    status INTEGER NOT NULL,
    streamed INTEGER NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cache_write_1h_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_nano_usd BIGINT NOT NULL,
    latency_us BIGINT,
    response_id TEXT,
    error INTEGER NOT NULL,
    unpriced INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    partial INTEGER NOT NULL,
    "user" TEXT,
    session TEXT,
    tags JSONB,
    service_tier TEXT,
    price TEXT,
    PRIMARY KEY (at, replica)
);

-- Sums per replica, hour, key, model and upstream, written in the same statement as the rows
-- they sum: /usage by day, hour, model, key or upstream reads these, not the rows. Each replica
-- writes only its own rows, so replicas never wait on one another's locks.
CREATE TABLE usage_hourly (
    replica BIGINT NOT NULL,
    hour BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    key_label TEXT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_nano_usd BIGINT NOT NULL,
    unpriced BIGINT NOT NULL,
    estimated BIGINT NOT NULL,
    cache_write_1h_tokens BIGINT NOT NULL,
    partial BIGINT NOT NULL,
    PRIMARY KEY (replica, hour, key_id, model, upstream)
);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

-- Each replica's own spend per budget scope (a key's name, or global) and window, as its guard
-- counts it; written whole (not added to), so a retry changes nothing. Budgets admit against
-- the sum of every replica's row of the current window.
CREATE TABLE spend (
    replica BIGINT NOT NULL,
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    nano_usd BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (replica, scope, period, window_start)
);
CREATE INDEX spend_window ON spend (period, window_start);

-- Each replica's use of each key's per-minute limits since it started, written whole.
CREATE TABLE rate_use (
    replica BIGINT NOT NULL,
    key_name TEXT NOT NULL,
    unit TEXT NOT NULL,
    used BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (replica, key_name, unit)
);

-- Budgets changed at run time (PUT /admin/keys/NAME/budget); every replica polls them.
CREATE TABLE budgets (
    scope TEXT PRIMARY KEY,
    daily BIGINT,
    monthly BIGINT,
    total BIGINT,
    version BIGINT NOT NULL
);
CREATE SEQUENCE budget_versions;

-- One row per alert fired: the replica that inserts it first sends it; the others do not.
CREATE TABLE alerts_fired (
    dedupe TEXT PRIMARY KEY,
    replica BIGINT NOT NULL,
    at BIGINT NOT NULL
);
