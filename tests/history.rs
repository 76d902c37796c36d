//! History from the ledger: `/stats` over a range, `/usage` grouped by day, hour, model and key,
//! `/export` streamed as CSV or JSON lines, and the `report` and `export` commands.

mod common;

use std::path::Path;

use common::{Binary, Mock, Proxy, binary_command, chat_request, key_id, ledger_row, write_ledger};
use serde_json::Value;

const ALICE: &str = "sk-alice-history-0001";
const BOB: &str = "sk-bob-history-0002";

/// Five requests over two days, with costs chosen by hand.
fn known_ledger(data: &Path) {
    write_ledger(
        data,
        [
            ledger_row(
                "2026-11-01T09:00:00Z",
                ALICE,
                "gpt-4o",
                (1000, 200),
                4_500_000,
            ),
            ledger_row(
                "2026-11-01T10:30:00Z",
                ALICE,
                "gpt-4o",
                (1000, 200),
                4_500_000,
            ),
            ledger_row(
                "2026-11-01T11:00:00Z",
                BOB,
                "gpt-4o-mini",
                (2000, 100),
                360_000,
            ),
            ledger_row(
                "2026-11-02T08:00:00Z",
                BOB,
                "gpt-4o-mini",
                (500, 50),
                105_000,
            ),
            ledger_row(
                "2026-11-02T09:00:00Z",
                ALICE,
                "claude-sonnet-4",
                (100, 10),
                450_000,
            ),
        ],
    );
}

fn rows(usage: &Value) -> &Vec<Value> {
    usage["rows"].as_array().expect("rows")
}

#[tokio::test]
async fn usage_is_grouped_by_day_hour_model_and_key_over_a_range() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    known_ledger(dir.path());
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;

    let by_day = proxy
        .get_json("/usage?group_by=day&since=2026-11-01&until=2026-11-03")
        .await;
    assert_eq!(by_day["group_by"], serde_json::json!(["day"]));
    assert_eq!(by_day["since"], "2026-11-01T00:00:00Z");
    let days = rows(&by_day);
    assert_eq!(days.len(), 2);
    assert_eq!(days[0]["day"], "2026-11-01");
    assert_eq!(days[0]["requests"], 3);
    assert_eq!(days[0]["cost_nano_usd"], 9_360_000);
    assert_eq!(days[0]["prompt_tokens"], 4000);
    assert_eq!(days[1]["day"], "2026-11-02");
    assert_eq!(days[1]["cost_nano_usd"], 555_000);
    assert_eq!(by_day["totals"]["requests"], 5);
    assert_eq!(by_day["totals"]["cost_nano_usd"], 9_915_000);

    let alice = proxy
        .get_json(&format!("/usage?group_by=key,day&key={}", key_id(ALICE)))
        .await;
    let lines = rows(&alice);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["key_id"], key_id(ALICE));
    assert!(lines[0]["key"].as_str().unwrap().ends_with("0001"));
    assert_eq!(lines[0]["requests"], 2);
    assert_eq!(lines[1]["requests"], 1);
    assert_eq!(alice["totals"]["cost_nano_usd"], 9_450_000);

    let mini = proxy
        .get_json("/usage?group_by=model&model=gpt-4o-mini")
        .await;
    assert_eq!(rows(&mini).len(), 1);
    assert_eq!(rows(&mini)[0]["model"], "gpt-4o-mini");
    assert_eq!(rows(&mini)[0]["completion_tokens"], 150);

    let hours = proxy
        .get_json("/usage?group_by=hour&since=2026-11-01T10:00:00Z&until=2026-11-01T12:00:00Z")
        .await;
    let hours = rows(&hours);
    assert_eq!(hours.len(), 2);
    assert_eq!(hours[0]["hour"], "2026-11-01T10:00:00Z");
    assert_eq!(hours[1]["hour"], "2026-11-01T11:00:00Z");
    proxy.stop().await;
}

#[tokio::test]
async fn stats_over_a_range_come_from_the_ledger() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    known_ledger(dir.path());
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let day_one = proxy
        .get_json("/stats?since=2026-11-01&until=2026-11-02")
        .await;
    assert_eq!(day_one["since"], "2026-11-01T00:00:00Z");
    assert_eq!(day_one["until"], "2026-11-02T00:00:00Z");
    assert_eq!(day_one["totals"]["requests"], 3);
    assert_eq!(day_one["keys"].as_array().unwrap().len(), 2);
    // Most expensive key first.
    assert_eq!(day_one["keys"][0]["id"], key_id(ALICE));
    assert_eq!(
        day_one["keys"][0]["models"]["gpt-4o"]["cost_nano_usd"],
        9_000_000
    );
    assert!(day_one.get("ledger").is_none());

    // Requests just answered are in history at once.
    proxy
        .chat_through("sk-now-0000001", &chat_request("gpt-4o", false))
        .await;
    proxy.stats_after(1).await;
    let recent = proxy.get_json("/stats?since=10m").await;
    assert_eq!(recent["totals"]["requests"], 1);

    let text = proxy.get_text("/stats?since=2026-11-01&format=text").await;
    assert!(
        text.contains("total since 2026-11-01T00:00:00Z: 6 requests"),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn bad_history_queries_get_a_clear_400() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    for (path, needle) in [
        ("/usage?group_by=week", "group_by"),
        ("/stats?since=banana", "since"),
        ("/usage?since=2h&until=3h", "before"),
        ("/export?format=xlsx", "csv or jsonl"),
    ] {
        let response = proxy.client.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query", "{path}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{path}: {message}");
    }
    proxy.stop().await;

    let in_memory = Proxy::start(&mock.url()).await;
    for path in ["/usage", "/export", "/stats?since=1h"] {
        let response = in_memory
            .client
            .get(in_memory.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "persistence_disabled", "{path}");
    }
}

#[tokio::test]
async fn export_has_every_row_as_csv_or_json_lines_and_no_key() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let key = "sk-proj-export-secret-0123456789";
    for stream in [false, true, false] {
        proxy
            .chat_through(key, &chat_request("gpt-4o", stream))
            .await;
    }
    let stats = proxy.stats_after(3).await;

    let response = proxy
        .client
        .get(proxy.url("/export?format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert!(
        response.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains(".csv")
    );
    let csv = response.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[0].starts_with("time,key_id,key,model,flavor,status,streamed,prompt_tokens"));
    let header: Vec<&str> = lines[0].split(',').collect();
    let streamed = header.iter().position(|c| *c == "streamed").unwrap();
    let fields: Vec<Vec<&str>> = lines[1..].iter().map(|l| l.split(',').collect()).collect();
    assert!(fields.iter().all(|f| f.len() == header.len()));
    assert_eq!(
        fields.iter().map(|f| f[streamed]).collect::<Vec<_>>(),
        ["false", "true", "false"]
    );
    assert!(!csv.contains("secret-0123456789"));

    let jsonl = proxy.get_text("/export?format=jsonl").await;
    let rows = common::json_lines(&jsonl);
    assert_eq!(rows.len(), 3);
    let cost: u64 = rows
        .iter()
        .map(|r| r["cost_nano_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(cost, stats["totals"]["cost_nano_usd"].as_u64().unwrap());
    assert_eq!(rows[0]["key_id"], key_id(key));
    assert_eq!(rows[0]["status"], 200);
    assert!(
        rows[0]["response_id"]
            .as_str()
            .unwrap()
            .starts_with("chatcmpl")
    );
    assert!(rows[0]["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(!jsonl.contains("secret-0123456789"));
    proxy.stop().await;
    // Nor is it in any file the ledger wrote (database, log, lock).
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(17).any(|w| w == b"secret-0123456789"),
            "the key is in {}",
            path.display()
        );
    }
}

/// The cells of one CSV line (RFC 4180: quoted cells, doubled quotes).
fn csv_cells(line: &str) -> Vec<String> {
    let (mut cells, mut cell) = (Vec::new(), String::new());
    let mut is_quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, is_quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            ('"', _) => is_quoted = !is_quoted,
            (',', false) => cells.push(std::mem::take(&mut cell)),
            (c, _) => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

#[tokio::test]
async fn a_csv_export_never_hands_a_spreadsheet_a_formula() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    // The mock answers with the model it was asked for, so the row's model is the client's text.
    let formula = r#"=HYPERLINK("http://x","x")"#;
    proxy
        .chat_through(ALICE, &chat_request(formula, false))
        .await;
    proxy.stats_after(1).await;

    let csv = proxy.get_text("/export?format=csv").await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header = csv_cells(lines[0]);
    let row = csv_cells(lines[1]);
    assert_eq!(row.len(), header.len(), "{csv}");
    let model = header.iter().position(|c| c == "model").unwrap();
    assert_eq!(row[model], format!("'{formula}"));
    // Numbers are left as numbers.
    let status = header.iter().position(|c| c == "status").unwrap();
    assert_eq!(row[status], "200");
    // JSON lines are not read by spreadsheets: the model is as recorded.
    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(rows[0]["model"], formula);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_100k_rows_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_ledger(
        &data,
        (0..100_000u32).map(|i| {
            let at = format!(
                "2026-11-01T{:02}:{:02}:{:02}Z",
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            );
            ledger_row(
                &at,
                ALICE,
                "gpt-4o-mini",
                (1000 + u64::from(i), 100),
                210_000,
            )
        }),
    );
    let mut command = binary_command(dir.path());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    let binary = Binary::start(command);
    let pid = binary.child.id();
    let before = common::peak_rss_kib(pid);

    let mut response = common::client()
        .get(binary.url("/export?format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("content-length").is_none(),
        "streamed, not buffered"
    );
    let (mut bytes, mut lines) = (0usize, 0usize);
    while let Some(chunk) = response.chunk().await.unwrap() {
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let grew = common::peak_rss_kib(pid).saturating_sub(before);
    eprintln!("export: {bytes} bytes, {lines} lines, peak RSS grew {grew} KiB");
    assert_eq!(lines, 100_001);
    assert!(bytes > 15_000_000, "{bytes}");
    // The whole export is ~20 MB; holding it would grow the process by at least that much.
    assert!(grew < 8 * 1024, "peak RSS grew {grew} KiB");
}

#[test]
fn report_prints_an_aligned_table_with_totals() {
    let dir = tempfile::tempdir().unwrap();
    known_ledger(&dir.path().join("data"));
    let output = binary_command(dir.path())
        .args([
            "report",
            "--since",
            "2026-11-01",
            "--until",
            "2026-11-03",
            "--by",
            "model",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = "\
llm-meter report: 2026-11-01T00:00:00Z to 2026-11-03T00:00:00Z
MODEL            REQUESTS  ERRORS  PROMPT  CACHED  COMPLETION       COST
gpt-4o                  2       0   2,000       0         400     $0.009
gpt-4o-mini             2       0   2,500       0         150  $0.000465
claude-sonnet-4         1       0     100       0          10   $0.00045
TOTAL                   5       0   4,600       0         560  $0.009915
";
    assert_eq!(stdout, expected);

    let by_day = binary_command(dir.path())
        .args(["report", "--period", "all", "--by", "day,key"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(by_day.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 1 + 4 + 1, "{stdout}");
    assert!(
        lines[0].starts_with("llm-meter report: all (the first request to now)"),
        "{stdout}"
    );
    assert!(lines[2].starts_with("2026-11-01  sk-"), "{stdout}");
    assert!(lines[5].starts_with("2026-11-02  sk-"), "{stdout}");

    let today = binary_command(dir.path()).arg("report").output().unwrap();
    let stdout = String::from_utf8(today.stdout).unwrap();
    assert!(
        stdout.ends_with("no requests recorded in this range\n"),
        "{stdout}"
    );
}

#[test]
fn export_command_writes_rows_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    known_ledger(&dir.path().join("data"));
    let output = binary_command(dir.path())
        .args(["export", "--format", "jsonl", "--since", "2026-11-02"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let rows = common::json_lines(&stdout);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["time"], "2026-11-02T08:00:00Z");
    assert_eq!(rows[1]["model"], "claude-sonnet-4");

    let csv = binary_command(dir.path()).arg("export").output().unwrap();
    assert_eq!(String::from_utf8(csv.stdout).unwrap().lines().count(), 6);

    let none = tempfile::tempdir().unwrap();
    let missing = binary_command(none.path()).arg("export").output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no ledger at"));
}
