//! The ledger in PostgreSQL answers history as the SQLite file does: the same `/usage` lines
//! (from the hourly rollup or from the rows), the same exported rows, `/stats?scope=all` across
//! a restart; each test has a database of its own on the machine's server.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use common::{Binary, Mock, TestDb, binary_command, chat_request, client, json_lines, openai_like};
use serde_json::{Value, json};

fn start(dir: &std::path::Path, mock: &Mock, ledger_url: Option<&str>) -> Binary {
    let mut command = binary_command(dir);
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    if let Some(url) = ledger_url {
        command.args(["--ledger-url", url]);
    }
    Binary::start(command)
}

/// Chats of two users, two teams, plain and streamed, two models.
async fn traffic(binary: &Binary) {
    for (i, (user, team, model, stream)) in [
        ("alice", "search", "gpt-4o", false),
        ("alice", "search", "gpt-4o-mini", true),
        ("bob", "ads", "gpt-4o", false),
        ("bob", "search", "gpt-4o", true),
        ("carol", "ads", "gpt-4o-mini", false),
    ]
    .into_iter()
    .enumerate()
    {
        let response = client()
            .post(binary.url("/v1/chat/completions"))
            .bearer_auth(format!("sk-pg-ledger-{}", i % 2))
            .header("X-LLM-Meter-User", user)
            .header("X-LLM-Meter-Tags", format!("team={team}, run=7"))
            .header("X-LLM-Meter-Session", "s-1")
            .json(&chat_request(model, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
}

async fn get(binary: &Binary, path: &str) -> Value {
    binary.get_json(path).await
}

/// Every row, from `/export` as JSON lines.
async fn exported(binary: &Binary) -> Vec<Value> {
    let text = client()
        .get(binary.url("/export?format=jsonl"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    json_lines(&text)
}

/// What an exported row says of its request (not its time or latency).
fn essentials(row: &Value) -> Value {
    json!([
        row["key_id"],
        row["model"],
        row["upstream"],
        row["input_tokens"],
        row["output_tokens"],
        row["cost_usd"],
        row["user"],
        row["session"],
        row["tags"],
        row["streamed"],
        row["status"]
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_from_postgres_matches_history_from_sqlite() {
    let db = TestDb::create();
    let mock = Mock::start(openai_like).await;
    let (sqlite_dir, pg_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sqlite = start(sqlite_dir.path(), &mock, None);
    let pg = start(pg_dir.path(), &mock, Some(&db.url()));
    traffic(&sqlite).await;
    traffic(&pg).await;
    for query in [
        "/usage?group_by=day,model",
        "/usage?group_by=key,upstream",
        "/usage?group_by=tag.team,user",
        "/usage?group_by=tag",
        "/usage?group_by=session&tag.team=search",
        "/usage?group_by=model&user=bob",
        "/usage?group_by=hour&since=3h",
        "/stats?since=1d",
    ] {
        let (mut a, mut b) = (get(&sqlite, query).await, get(&pg, query).await);
        for view in [&mut a, &mut b] {
            // The ranges' own ends differ by the moment each was asked.
            view["since"] = Value::Null;
            view["until"] = Value::Null;
        }
        assert_eq!(a, b, "{query}");
    }
    let (a, b) = (exported(&sqlite).await, exported(&pg).await);
    assert_eq!(a.len(), 5);
    assert_eq!(
        a.iter().map(essentials).collect::<Vec<_>>(),
        b.iter().map(essentials).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_hours_from_the_rollup_and_ragged_ends_from_the_rows_add_up() {
    let db = TestDb::create();
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start(dir.path(), &mock, Some(&db.url()));
    traffic(&pg).await;
    // Rows three hours back and an hour and a half back, as if recorded then.
    let pg_sync = get(&pg, "/usage?group_by=model").await;
    assert_eq!(pg_sync["totals"]["requests"], 5);
    db.with(|c| {
        c.batch_execute(
            "INSERT INTO requests SELECT replica + 1, at - 10800000000, period, input_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd, latency_us, key_id, key_label, model, upstream, flavor, service_tier, price, status, flags, response_id, \"user\", session, tags FROM requests;
             INSERT INTO requests SELECT replica + 2, at - 5400000000, period, input_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd, latency_us, key_id, key_label, model, upstream, flavor, service_tier, price, status, flags, response_id, \"user\", session, tags FROM requests WHERE replica IN (SELECT DISTINCT replica FROM requests ORDER BY replica LIMIT 1);
             INSERT INTO usage_hourly SELECT replica, at / 3600000000, key_id, model, upstream, max(key_label), count(*), sum(error), sum(input_tokens), sum(cached_tokens), sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost_nano_usd), sum(unpriced), sum(estimated), sum(cache_write_1h_tokens), sum(partial) FROM request_rows r WHERE NOT EXISTS (SELECT 1 FROM usage_hourly u WHERE u.replica = r.replica) GROUP BY replica, at / 3600000000, key_id, model, upstream",
        )
        .unwrap();
    });
    assert_eq!(db.number("SELECT count(*) FROM requests"), 15);
    for since in ["4h", "2h", "100m", "30m"] {
        // By model, the rollup answers the whole hours; by model and user, only the rows do.
        let rolled = get(&pg, &format!("/usage?group_by=model&since={since}")).await;
        let rows = get(&pg, &format!("/usage?group_by=model,user&since={since}")).await;
        assert_eq!(rolled["totals"], rows["totals"], "since {since}");
    }
    let all = get(&pg, "/usage?group_by=day").await;
    assert_eq!(all["totals"]["requests"], 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_totals_survive_a_restart_in_scope_all() {
    let db = TestDb::create();
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &mock, Some(&db.url()));
    traffic(&first).await;
    let before = get(&first, "/stats?scope=all").await;
    assert_eq!(before["totals"]["requests"], 5, "{before}");
    assert_eq!(before["ledger"]["integrity"], "kept by the server");
    assert!(
        before["ledger"]["shared"]["replica"].is_string(),
        "{before}"
    );
    let (stopped, _, err) = first.terminate();
    assert!(stopped, "{err}");
    let second = start(dir.path(), &mock, Some(&db.url()));
    // This replica's own totals start at zero; every replica's are in the database.
    assert_eq!(get(&second, "/stats").await["totals"]["requests"], 0);
    let after = get(&second, "/stats?scope=all").await;
    assert_eq!(after["totals"], before["totals"]);
    assert_eq!(after["keys"], before["keys"]);
    // Without a shared ledger there is no scope=all.
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite = start(sqlite_dir.path(), &mock, None);
    let response = client()
        .get(sqlite.url("/stats?scope=all"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ledger_url"),
        "{body}"
    );
    let reprice = binary_command(dir.path())
        .env("LLM_METER_LEDGER_URL", db.url())
        .args(["reprice", "--since", "1d"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&reprice.stderr);
    assert!(
        !reprice.status.success() && err.contains("SQLite ledger only"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_postgres_cannot_store_is_stored_changed_not_stalling_the_ledger() {
    let db = TestDb::create();
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start(dir.path(), &mock, Some(&db.url()));
    // Valid JSON, but PostgreSQL refuses a NUL byte in any text.
    let body = r#"{"model": "gpt-4o\u0000x", "messages": [{"role": "user", "content": "hi"}]}"#;
    let response = client()
        .post(pg.url("/v1/chat/completions"))
        .bearer_auth("sk-pg-ledger-nul")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap();
    traffic(&pg).await;
    let usage = get(&pg, "/usage?group_by=model").await;
    assert_eq!(usage["totals"]["requests"], 6, "{usage}");
    let stats = get(&pg, "/stats").await;
    assert_eq!(stats["ledger"]["failing"], false, "{stats}");
    assert_eq!(
        db.number("SELECT count(*) FROM request_rows WHERE model = 'gpt-4o' || chr(65533) || 'x'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_under_the_first_schema_read_the_same_after_the_narrower_one() {
    let db = TestDb::create();
    // A database as the first schema left it, with two rows: one plain, one with every flag,
    // no tier and no price.
    let hour_ago = i64::try_from(
        (std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap();
    db.with(|c| {
        c.batch_execute(
            "CREATE TABLE llm_meter_migrations (version INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO llm_meter_migrations (version) VALUES (1);",
        )
        .unwrap();
        c.batch_execute(include_str!("../src/meter/ledger/pg/migrations/1.sql"))
            .unwrap();
        c.execute(
            "INSERT INTO requests VALUES
             (7, $1, 1, 'k1', 'sk-…k1', 'gpt-4o', 'openai', 'openai_chat', 200, 1, 10, 2, 3, 1,
              5, 4, 777000, 1500, 'r1', 0, 0, 0, 0, 'alice', 's-9', '{\"team\": \"a\"}', 'flex',
              'built-in: gpt-4o'),
             (7, $1 + 1, 1, 'k2', 'sk-…k2', 'mystery', 'other', 'anthropic_messages', 502, 0,
              6, 0, 0, 0, 0, 0, 0, NULL, NULL, 1, 1, 1, 1, NULL, NULL, NULL, NULL, NULL)",
            &[&hour_ago],
        )
        .unwrap();
    });
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start(dir.path(), &mock, Some(&db.url()));
    assert_eq!(
        db.number("SELECT max(version)::bigint FROM llm_meter_migrations"),
        2
    );
    let rows = exported(&pg).await;
    let fields = [
        "key_id",
        "key",
        "model",
        "upstream",
        "flavor",
        "status",
        "streamed",
        "input_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_nano_usd",
        "latency_ms",
        "response_id",
        "error",
        "unpriced",
        "estimated",
        "partial",
        "user",
        "session",
        "tags",
        "service_tier",
        "price",
    ];
    let seen: Vec<Vec<Value>> = rows
        .iter()
        .map(|row| fields.iter().map(|f| row[*f].clone()).collect())
        .collect();
    assert_eq!(
        seen,
        [
            json!([
                "k1", "sk-…k1", "gpt-4o", "openai", "openai_chat", 200, true, 10, 2, 3, 1, 5, 4,
                777000, 1.5, "r1", false, false, false, false, "alice", "s-9", {"team": "a"},
                "flex", "built-in: gpt-4o"
            ]),
            json!([
                "k2",
                "sk-…k2",
                "mystery",
                "other",
                "anthropic_messages",
                502,
                false,
                6,
                0,
                0,
                0,
                0,
                0,
                0,
                null,
                null,
                true,
                true,
                true,
                true,
                null,
                null,
                null,
                "standard",
                null
            ]),
        ]
        .map(|v| v.as_array().unwrap().clone())
    );
    // New rows go in beside them, named through the same table of names.
    traffic(&pg).await;
    let mut total = 0;
    for _ in 0..100 {
        total = db.number("SELECT count(*) FROM request_rows WHERE model IS NOT NULL");
        if total == 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(total, 7);
    assert_eq!(
        db.number("SELECT count(*) FROM names WHERE name = 'gpt-4o'"),
        1
    );
}
