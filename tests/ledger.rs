//! The durable ledger: totals survive restarts exactly, a hard kill loses at most the flush
//! window, a failing disk never stops forwarding, and files that are not ours are refused untouched.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::{
    Binary, Mock, Proxy, binary_command, chat_request, ledger_row, totals_of, write_ledger,
};
use llm_meter::meter::ledger::history::{Filter, Reader};
use serde_json::Value;

/// Requests the ledger in `data` holds, read as `llm-meter report` would.
fn rows_in(data: &Path) -> u64 {
    let reader = Reader::open(data).expect("a readable ledger");
    let lines = reader
        .usage(&[], &Filter::default())
        .expect("summable rows");
    lines.first().map_or(0, |l| l.counts.requests)
}

/// Sends a mix of keys, models (one unpriced), plain and streamed requests.
async fn send_mix(proxy: &Proxy, n: usize) {
    for i in 0..n {
        let key = if i % 3 == 0 {
            "sk-alice-000111"
        } else {
            "sk-bob-000222"
        };
        let model = ["gpt-4o", "gpt-4o-mini-2024-07-18", "my-local-llama"][i % 3];
        proxy
            .chat_through(key, &chat_request(model, i % 2 == 0))
            .await;
    }
}

#[tokio::test]
async fn stats_after_a_restart_equal_stats_before_it_to_the_nano_dollar() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    send_mix(&proxy, 30).await;
    let before = totals_of(proxy.stats_after(30).await);
    proxy.stop().await;

    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let after = totals_of(proxy.stats().await);
    assert_eq!(before, after);
    assert_eq!(after["totals"]["requests"], 30);
    assert_eq!(after["totals"]["unpriced_requests"], 10);
    assert!(after["totals"]["cost_nano_usd"].as_u64().unwrap() > 0);
    // And the restored totals keep counting.
    send_mix(&proxy, 3).await;
    assert_eq!(proxy.stats_after(33).await["totals"]["requests"], 33);
    proxy.stop().await;
}

#[tokio::test]
async fn reset_starts_a_new_period_that_survives_restarts_and_history_keeps_both() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    send_mix(&proxy, 3).await;
    proxy.stats_after(3).await;
    let closed = proxy.reset().await;
    assert_eq!(closed["totals"]["requests"], 3);
    send_mix(&proxy, 2).await;
    let before = totals_of(proxy.stats_after(2).await);
    proxy.stop().await;

    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let after = totals_of(proxy.stats().await);
    assert_eq!(after, before);
    assert_eq!(after["totals"]["requests"], 2);
    let history = proxy.get_json("/stats?since=1h").await;
    assert_eq!(history["totals"]["requests"], 5);
    proxy.stop().await;
}

#[tokio::test]
async fn a_failing_disk_never_stops_forwarding_and_its_backlog_is_bounded_and_reported() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = "flush_interval = \"10ms\"\nmax_pending_rows = 5\n";
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), toml).await;
    // Another connection holds the write lock: every commit of ours fails as on a full disk.
    let blocker = rusqlite::Connection::open(dir.path().join("ledger.sqlite3")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let started = Instant::now();
    for _ in 0..8 {
        let response = proxy
            .chat("sk-disk-full-01", &chat_request("gpt-4o", false))
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // The writer waits a second for the lock on every attempt; requests never wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let stats = poll(&proxy, |s| s["ledger"]["lost_rows"] == 3).await;
    assert_eq!(stats["ledger"]["failing"], true);
    assert_eq!(stats["ledger"]["pending_rows"], 5);
    assert!(
        stats["ledger"]["last_error"]
            .as_str()
            .unwrap()
            .contains("locked")
    );
    // Live totals still count every request.
    assert_eq!(stats["totals"]["requests"], 8);

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let stats = poll(&proxy, |s| s["ledger"]["pending_rows"] == 0).await;
    assert_eq!(stats["ledger"]["failing"], false);
    assert_eq!(stats["ledger"].get("last_error"), None);
    proxy.stop().await;
    // The rows given up are the only ones missing after a restart.
    assert_eq!(rows_in(dir.path()), 5);
}

/// Holds the write lock of the ledger in `data`, so that every commit fails as on a full disk,
/// until dropped.
fn failing_disk(data: &Path) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(data.join("ledger.sqlite3")).expect("the ledger");
    blocker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("the write lock");
    blocker
}

#[tokio::test]
async fn a_graceful_stop_on_a_failing_disk_counts_the_rows_it_loses_once() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = "flush_interval = \"10ms\"\n";
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), toml).await;
    let blocker = failing_disk(dir.path());
    for _ in 0..3 {
        proxy
            .chat_through("sk-disk-full-02", &chat_request("gpt-4o", false))
            .await;
    }
    poll(&proxy, |s| s["ledger"]["failing"] == true).await;
    let state = proxy.state.clone();
    proxy.stop().await;
    let health = state.meter.ledger().unwrap().health();
    assert_eq!((health.lost_rows, health.pending_rows), (3, 0));
    drop(blocker);
    assert_eq!(rows_in(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_on_a_failing_disk_logs_the_rows_it_loses_on_one_line() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("proxy.toml"), "flush_interval = \"10ms\"\n").unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    let blocker = failing_disk(&dir.path().join("data"));
    for _ in 0..3 {
        binary
            .chat_through("sk-disk-full-03", &chat_request("gpt-4o", false))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while binary.get_json("/stats").await["ledger"]["failing"] != true {
        assert!(Instant::now() < deadline, "the ledger never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, stderr) = binary.terminate();
    let lost: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("the rows not yet written are lost"))
        .collect();
    assert_eq!(lost.len(), 1, "{stderr}");
    assert!(lost[0].contains("lost_rows=3"), "{stderr}");
    drop(blocker);
}

async fn poll(proxy: &Proxy, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        let stats = proxy.stats().await;
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition never met: {}", proxy.stats().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_writes_everything_even_with_a_long_flush_interval() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("proxy.toml"), "flush_interval = \"60s\"\n").unwrap();
    let start = || {
        let mut command = binary_command(dir.path());
        command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
        Binary::start(command)
    };
    let binary = start();
    assert!(
        binary.banner.contains("ledger.sqlite3"),
        "{}",
        binary.banner
    );
    for _ in 0..10 {
        binary
            .chat_through("sk-graceful-1", &chat_request("gpt-4o", true))
            .await;
    }
    let before = binary.get_json("/stats").await;
    assert_eq!(before["ledger"]["pending_rows"], 10);
    let (ok, _, _) = binary.terminate();
    assert!(ok);

    let binary = start();
    let after = binary.get_json("/stats").await;
    assert_eq!(totals_of(after), totals_of(before));
}

/// A process killed with `kill -9` loses at most its flush window (`flush_interval`, 100 ms by
/// default): every row the ledger had committed survives, and only the requests answered since
/// its last commit can be lost. Under a steady load, the test takes the count of answers at one
/// point and waits until /stats says the ledger has written at least that many rows (a flush
/// interval, or longer on a busy CPU: the writer runs at background priority), then stops the
/// load and kills the process. It asserts counts, never durations, so a slow machine can make
/// the last window longer but not fail the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_kill_loses_at_most_the_rows_answered_since_the_last_flush() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let mut binary = Binary::start(command);
    let client = common::client();
    let (chat_url, stats_url) = (binary.url("/v1/chat/completions"), binary.url("/stats"));
    let answered = AtomicU64::new(0);
    let is_stopping = AtomicBool::new(false);
    // One client, one request after another: none is in flight when the load stops.
    let load = async {
        while !is_stopping.load(SeqCst) {
            let response = client
                .post(&chat_url)
                .bearer_auth("sk-killed-01")
                .json(&chat_request("gpt-4o", false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            answered.fetch_add(1, SeqCst);
        }
    };
    let written = async {
        while answered.load(SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = answered.load(SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stats: Value = client
                .get(&stats_url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let written = stats["ledger"]["written_rows"].as_u64().unwrap();
            if written >= before {
                is_stopping.store(true, SeqCst);
                return written;
            }
            assert!(
                Instant::now() < deadline,
                "{before} rows never written: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let ((), written) = tokio::join!(load, written);
    binary.child.kill().unwrap();
    binary.child.wait().unwrap();

    let answered = answered.into_inner();
    let rows = rows_in(&dir.path().join("data"));
    eprintln!(
        "hard kill: {answered} answered, {written} written at the last look, {rows} in the \
         ledger, {} lost",
        answered.saturating_sub(rows)
    );
    assert!(rows <= answered, "{rows} rows for {answered} answers");
    // So the rows lost are at most the answers since the last commit seen:
    // answered - rows <= answered - written.
    assert!(
        rows >= written,
        "{rows} rows, but the ledger had written {written} before the kill"
    );
}

fn serve_once(dir: &Path) -> Output {
    let mut command = binary_command(dir);
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    command.output().expect("the binary runs")
}

fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
}

#[test]
fn a_corrupt_ledger_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let file = data.join("ledger.sqlite3");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &garbage).unwrap();
    assert_refused(
        &serve_once(dir.path()),
        &[
            &file.display().to_string(),
            "not an llm-meter ledger",
            "left untouched",
        ],
    );
    assert_eq!(std::fs::read(&file).unwrap(), garbage);
    assert!(!data.join("ledger.sqlite3-wal").exists());
}

#[test]
fn another_applications_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let file = data.join("ledger.sqlite3");
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    let before = std::fs::read(&file).unwrap();
    assert_refused(&serve_once(dir.path()), &["another application"]);
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[test]
fn a_ledger_from_a_newer_llm_meter_is_refused_by_serve_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_ledger(&data, []);
    rusqlite::Connection::open(data.join("ledger.sqlite3"))
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    assert_refused(
        &serve_once(dir.path()),
        &["schema version 99", "upgrade llm-meter"],
    );
    let report = binary_command(dir.path()).arg("report").output().unwrap();
    assert_refused(&report, &["schema version 99"]);
}

#[test]
fn a_second_server_on_the_same_ledger_says_so_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = binary_command(dir.path());
    first.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    let first = Binary::start(first);
    let pid = first.child.id().to_string();
    assert_refused(
        &serve_once(dir.path()),
        &["in use by another llm-meter", &pid],
    );
    // The first one is unaffected.
    drop(first);
    // Once it is gone, the ledger is free again (the lock dies with the process).
    let mut again = binary_command(dir.path());
    again.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    drop(Binary::start(again));
}

#[test]
fn an_unusable_data_dir_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let mut command = binary_command(dir.path());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        not_a_dir.join("sub").to_str().unwrap(),
    ]);
    assert_refused(
        &command.output().unwrap(),
        &["cannot use data directory", "sub"],
    );
}

#[tokio::test]
async fn no_persist_writes_nothing() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with(
        &mock.url(),
        &format!("data_dir = {:?}\npersist = false\n", dir.path()),
    )
    .await;
    send_mix(&proxy, 2).await;
    let stats = proxy.stats_after(2).await;
    assert_eq!(stats["ledger"], Value::Null);
    proxy.stop().await;
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn rows_say_when_a_stream_was_cut_short_by_the_client_or_the_upstream() {
    use bytes::Bytes;
    use common::{Chunk, Reply, chat_stream};
    let mock = Mock::start(|r: &common::Received| {
        let events = chat_stream("gpt-4o", &["a", "b"], Some((5, 2)));
        let chunks = events.into_iter().map(|e| Chunk::now(Bytes::from(e)));
        match r.json()["model"].as_str() {
            // The client reads the first event, then leaves; the rest never comes.
            Some("leave") => Reply::Stream {
                chunks: chunks.take(1).collect(),
                then_cut: false,
                then_hang: true,
            },
            // The upstream cuts the connection after two events.
            _ => Reply::Stream {
                chunks: chunks.take(2).collect(),
                then_cut: true,
                then_hang: false,
            },
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let mut leaving = proxy
        .chat("sk-partial-01", &chat_request("leave", true))
        .await;
    assert!(leaving.chunk().await.unwrap().is_some());
    drop(leaving);
    let cut = proxy
        .chat("sk-partial-01", &chat_request("cut", true))
        .await;
    assert!(cut.bytes().await.is_err());
    proxy.stats_after(2).await;

    let rows = proxy.get_text("/export?format=jsonl").await;
    let rows = common::json_lines(&rows);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["partial"], true, "{row}");
        assert_eq!(row["streamed"], true, "{row}");
        assert_eq!(row["model"], "gpt-4o", "{row}");
    }
    // Leaving is not an error (the provider may still bill it); a cut stream is.
    let by_error: Vec<bool> = rows.iter().map(|r| r["error"] == true).collect();
    assert_eq!(by_error.iter().filter(|e| **e).count(), 1, "{rows:?}");
    proxy.stop().await;
}

/// Polls /stats until the ledger's corruption check has a result, and returns it.
async fn integrity(proxy: &Proxy) -> String {
    let stats = poll(proxy, |s| s["ledger"]["integrity"] != "checking").await;
    stats["ledger"]["integrity"]
        .as_str()
        .expect("an integrity string")
        .to_owned()
}

/// A closed ledger in `data` with enough rows for its `requests` table to span many pages.
fn ledger_of_many_pages(data: &Path) {
    let row = ledger_row(
        "2026-11-24T09:00:00Z",
        "sk-pages-000111",
        "gpt-4o",
        (1000, 200),
        4_500_000,
    );
    write_ledger(data, std::iter::repeat_n(row, 5_000));
    assert!(
        !data.join("ledger.sqlite3-wal").exists(),
        "the ledger was not checkpointed on close"
    );
    // The writer's batches interleave the rows' pages with the period sums' (how many batches
    // depends on timing); rebuilt, each table's pages are contiguous, so the middle of the file
    // is the rows' and a damage there never reaches what the start reads.
    rusqlite::Connection::open(data.join("ledger.sqlite3"))
        .expect("the ledger opens")
        .execute_batch("VACUUM")
        .expect("the ledger is rebuilt");
}

#[tokio::test]
async fn a_healthy_ledger_passes_the_integrity_check_at_start() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    ledger_of_many_pages(dir.path());
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    assert_eq!(integrity(&proxy).await, "ok");
    proxy.stop().await;
}

#[tokio::test]
async fn a_ledger_damaged_in_the_middle_starts_and_reports_a_failed_integrity_check() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    ledger_of_many_pages(dir.path());
    let file = dir.path().join("ledger.sqlite3");
    let mut bytes = std::fs::read(&file).unwrap();
    // The page size is at offset 16 of the header (big-endian; 1 means 65536).
    let page = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65_536,
        size => usize::from(size),
    };
    let pages = bytes.len() / page;
    assert!(pages > 40, "only {pages} pages");
    // Pages in the middle hold old request rows: the start (which reads the header, the current
    // period's totals and the newest row) does not touch them; a full check does.
    let damaged = pages * 2 / 5 * page..pages * 3 / 5 * page;
    for (i, byte) in bytes[damaged].iter_mut().enumerate() {
        *byte = (i * 7 % 251) as u8;
    }
    std::fs::write(&file, &bytes).unwrap();

    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    // Started and serving, with the totals it restored.
    assert_eq!(proxy.stats().await["totals"]["requests"], 5_000);
    let response = proxy
        .chat("sk-pages-000111", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(response.status(), 200);
    let integrity = integrity(&proxy).await;
    // SQLite's first findings, on one line.
    assert!(integrity.starts_with("failed: Tree "), "{integrity}");
    assert!(!integrity.contains('\n'), "{integrity}");
    proxy.stop().await;
}
