//! Replicas on one PostgreSQL ledger: three llm-meter processes given the same `ledger_url`,
//! under concurrent load through all three, keep exact totals, one budget, one rate limit and
//! one alert per threshold; a replica killed loses at most its flush window; PostgreSQL
//! stopped and started under load loses and doubles nothing.
//!
//! Each test has a database of its own on the machine's server (or, to stop one, a server of
//! its own); each replica a data directory of its own.

#![expect(clippy::unwrap_used, reason = "request helpers")]
#![expect(
    clippy::disallowed_methods,
    reason = "the load's tasks are each awaited before the test ends"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    Binary, Mock, OwnServer, Received, Reply, TestDb, binary_command, chat_completion, client,
    run_to_end,
};
use serde_json::{Value, json};

/// The tests here each run two or three servers under load: one at a time, so that their
/// timing bounds hold on a small machine running the rest of the suite.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every request costs exactly $0.01: 1,000 prompt tokens of a model priced at $10 a million.
const COST_USD: f64 = 0.01;
const ADMIN: &str = "admin-token-for-replicas";

fn priced(_: &Received) -> Reply {
    Reply::json(200, &chat_completion("meter-test", "ok", 1_000, 0))
}

fn sha256_hex(key: &str) -> String {
    llm_meter::key::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// proxy.toml of every replica: the shared ledger, the test model's price, the admin token,
/// and `keys` (`(name, key, settings)`).
fn config(url: &str, keys: &[(&str, &str, &str)]) -> String {
    let mut toml = format!(
        "ledger_url = \"{url}\"\nadmin_token = \"{ADMIN}\"\n\
         [pricing.\"meter-test\"]\ninput_per_million = 10.0\noutput_per_million = 0.0\n"
    );
    for (name, key, settings) in keys {
        toml.push_str(&format!(
            "[keys.{name}]\nkey_sha256 = \"{}\"\n{settings}\n",
            sha256_hex(key)
        ));
    }
    toml
}

/// Starts `n` replicas at once (their migrations race), each with its own data directory.
fn start_replicas(dir: &std::path::Path, toml: &str, mock: &Mock, n: usize) -> Vec<Binary> {
    std::fs::write(dir.join("proxy.toml"), toml).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut command = binary_command(dir);
            command
                .env("LLM_METER_DATA_DIR", dir.join(format!("data-{i}")))
                .args(["--config", "proxy.toml", "--listen", "127.0.0.1:0"])
                .args(["--upstream", &mock.url()]);
            std::thread::spawn(move || Binary::start(command))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One answered request: its status, and when it was answered.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: u16,
    at: Instant,
}

/// Sends chats with `key` to `url` from `workers` tasks until `stop` (or a worker's error
/// budget runs out); returns every answer.
async fn hammer(
    url: String,
    key: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Answer> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let http = client();
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&json!({"model": "meter-test", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await;
                match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        // The answer counts once its body is in.
                        let whole = response.bytes().await.is_ok();
                        if whole {
                            answers.push(Answer {
                                status,
                                at: Instant::now(),
                            });
                        }
                    }
                    // The replica is gone (killed): this worker is done.
                    Err(_) => break,
                }
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Starts `hammer` on every replica; each task's answers.
fn load_all(
    replicas: &[Binary],
    key: &'static str,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    replicas
        .iter()
        .map(|r| tokio::spawn(hammer(r.url(""), key, workers, Arc::clone(stop))))
        .collect()
}

/// One chat with `key` through `replica` ($0.01 at the test's price).
async fn chat(replica: &Binary, key: &str) -> reqwest::Response {
    client()
        .post(replica.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "meter-test", "messages": []}))
        .send()
        .await
        .unwrap()
}

fn ok(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.status == 200).count()
}

/// Waits until the shared ledger holds `expected` rows (the replicas flush every 100 ms).
fn wait_for_rows(db: &TestDb, expected: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rows = db.number("SELECT count(*) FROM requests");
        if rows == expected || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn get_json(binary: &Binary, path: &str) -> Value {
    client()
        .get(binary.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_starting_together_count_every_request_exactly_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    // The machine's server trusts loopback: the password is not checked, only never shown.
    let url = db
        .url()
        .replace("postgres://postgres@", "postgres://postgres:hunter2@");
    let toml = config(&url, &[]);
    let replicas = start_replicas(dir.path(), &toml, &mock, 3);
    // Each of the two migrations ran once, whichever replica got there first.
    assert_eq!(db.number("SELECT count(*) FROM llm_meter_migrations"), 2);
    assert_eq!(
        db.number("SELECT max(version)::bigint FROM llm_meter_migrations"),
        2
    );
    let banner = &replicas[0].banner;
    assert!(
        banner.contains("ledger postgres://postgres:***@127.0.0.1:5432/"),
        "{banner}"
    );
    assert!(!banner.contains("hunter2"), "{banner}");
    let stats = get_json(&replicas[0], "/stats").await;
    assert!(!stats.to_string().contains("hunter2"), "{stats}");

    let stop = Arc::new(AtomicBool::new(false));
    let loads = load_all(&replicas, "sk-replica-load-0123456789", 4, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for load in loads {
        let answers = load.await.unwrap();
        assert!(answers.iter().all(|a| a.status == 200));
        answered += ok(&answers);
    }
    let answered = i64::try_from(answered).unwrap();
    assert!(answered > 100, "only {answered} requests in 2 s");
    assert_eq!(wait_for_rows(&db, answered), answered);

    // Every replica's /stats?scope=all, /usage and the commands see the same exact totals.
    let expected_cost = answered as f64 * COST_USD;
    for replica in &replicas {
        let all = get_json(replica, "/stats?scope=all").await;
        assert_eq!(all["totals"]["requests"], json!(answered), "{all}");
        assert_eq!(all["totals"]["prompt_tokens"], json!(answered * 1_000));
        let cost = all["totals"]["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - expected_cost).abs() < 1e-9,
            "{cost} vs {expected_cost}"
        );
    }
    let own: i64 = {
        let mut sum = 0;
        for replica in &replicas {
            sum += get_json(replica, "/stats").await["totals"]["requests"]
                .as_i64()
                .unwrap();
        }
        sum
    };
    assert_eq!(
        own, answered,
        "each replica's own totals add up to the shared ones"
    );
    let usage = get_json(&replicas[1], "/usage?group_by=day,model").await;
    assert_eq!(usage["totals"]["requests"], json!(answered), "{usage}");
    let url = db.url();
    let (success, out, err) = run_to_end(
        dir.path(),
        &["export", "--ledger-url", &url, "--format", "jsonl"],
    );
    assert!(success, "{err}");
    assert_eq!(i64::try_from(out.lines().count()).unwrap(), answered);
    let (success, out, err) = run_to_end(
        dir.path(),
        &[
            "report",
            "--ledger-url",
            &url,
            "--by",
            "model",
            "--format",
            "json",
        ],
    );
    assert!(success, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["totals"]["requests"], json!(answered), "{report}");
    for replica in replicas {
        let (stopped, _, err) = replica.terminate();
        assert!(stopped, "{err}");
        assert!(
            !err.contains("hunter2"),
            "the password is never logged: {err}"
        );
    }
    assert_eq!(db.number("SELECT count(*) FROM requests"), answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_dollar_budget_holds_across_replicas_and_each_alert_fires_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const KEY: &str = "sk-replica-budget-0123456789";
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&db.url(), &[("agent", KEY, "daily_usd = 1.0")]);
    let replicas = start_replicas(dir.path(), &toml, &mock, 3);
    let workers = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loads = load_all(&replicas, KEY, workers, &stop);
    // Until every replica refuses.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut refusing = 0;
        for replica in &replicas {
            let view = get_json(replica, "/admin/keys").await;
            let spent = view["keys"][0]["budget"][0]["spent_usd"]
                .as_f64()
                .unwrap_or(0.0);
            if spent >= 1.0 {
                refusing += 1;
            }
        }
        if refusing == replicas.len() || Instant::now() > deadline {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut admitted = 0;
    let mut rates = 0.0_f64;
    for load in loads {
        let answers = load.await.unwrap();
        assert!(answers.iter().all(|a| a.status == 200 || a.status == 429));
        let n = ok(&answers);
        admitted += n;
        // This replica's rate while it admitted: its answers until its last 200.
        let last = answers
            .iter()
            .filter(|a| a.status == 200)
            .map(|a| a.at)
            .max();
        if let Some(last) = last {
            rates += n as f64 / last.duration_since(started).as_secs_f64().max(0.05);
        }
    }
    let spent = admitted as f64 * COST_USD;
    // The documented bound: the requests in flight when the budget was crossed (every
    // worker's), plus half a second of every replica's spend (the sync staleness).
    let in_flight = (workers * replicas.len()) as f64 * COST_USD;
    let stale = rates * 0.5 * COST_USD;
    let bound = 1.0 + in_flight + stale;
    eprintln!(
        "budget $1.00: ${spent:.2} admitted by 3 replicas (bound ${bound:.2}: in flight ${in_flight:.2}, staleness ${stale:.2})"
    );
    assert!(spent >= 1.0, "${spent} admitted: the budget refused early");
    assert!(
        spent <= bound,
        "${spent} admitted, more than the bound ${bound}"
    );
    assert_eq!(
        wait_for_rows(&db, i64::try_from(admitted).unwrap()),
        i64::try_from(admitted).unwrap()
    );

    // 50 %, 80 % and 100 %, and the hourly anomaly (a 24th of the day's budget): once each,
    // across the three.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut kinds: Vec<String> = Vec::new();
    for replica in &replicas {
        let alerts = get_json(replica, "/alerts").await;
        for alert in alerts["alerts"].as_array().unwrap() {
            kinds.push(format!("{} {}", alert["kind"], alert["threshold_percent"]));
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "\"budget_threshold\" 100",
            "\"budget_threshold\" 50",
            "\"budget_threshold\" 80",
            "\"hourly_spend\" null"
        ],
        "each alert once across the replicas"
    );
    assert_eq!(db.number("SELECT count(*) FROM alerts_fired"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_changed_on_one_replica_holds_on_the_others_within_a_second() {
    let _turn = ONE_AT_A_TIME.lock().await;
    budget_change_arrives_within_a_second("daily_usd = 100.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_set_where_none_was_reaches_every_replica_within_a_second() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // No budget or limit anywhere: the replicas sync every half second, not every 100 ms,
    // and the change still arrives in time.
    budget_change_arrives_within_a_second("").await;
}

/// Sets key `agent`'s daily budget to $0.005 on replica 0 (its settings in proxy.toml:
/// `settings`) and waits for replica 2, which spent $0.01 already, to refuse it.
async fn budget_change_arrives_within_a_second(settings: &str) {
    const KEY: &str = "sk-replica-change-0123456789";
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&db.url(), &[("agent", KEY, settings)]);
    let replicas = start_replicas(dir.path(), &toml, &mock, 3);
    assert_eq!(chat(&replicas[2], KEY).await.status(), 200);
    let changed = Instant::now();
    let response = client()
        .put(replicas[0].url("/admin/keys/agent/budget"))
        .bearer_auth(ADMIN)
        .json(&json!({"daily_usd": 0.005}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // Replica 2 already spent $0.01: over the new budget as soon as it hears of it.
    loop {
        if chat(&replicas[2], KEY).await.status() == 429 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "the change took more than a second to arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = changed.elapsed();
    eprintln!("a budget changed on one replica refused on another after {took:?}");
    // Replica 1 syncs on a clock of its own: it shows the change within the same second.
    loop {
        let view = get_json(&replicas[1], "/admin/keys").await;
        if view["keys"][0]["budget"][0]["limit_usd"] == json!(0.005) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "replica 1 still shows {view} after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A replica started later takes the changed budget over proxy.toml's.
    let late = start_replicas(dir.path(), &toml, &mock, 1);
    assert_eq!(chat(&late[0], KEY).await.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_stopped_at_once_leaves_its_spend_for_a_budget_given_later() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const KEY: &str = "sk-replica-stop-0123456789";
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    // No budget anywhere: the spend is otherwise written once a second, and the stop comes
    // sooner.
    let toml = config(&db.url(), &[("agent", KEY, "")]);
    let replica = start_replicas(dir.path(), &toml, &mock, 1).remove(0);
    let response = chat(&replica, KEY).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let (exited, _, stderr) = tokio::task::spawn_blocking(move || replica.terminate())
        .await
        .unwrap();
    assert!(exited, "{stderr}");
    // $0.01, in the key's total.
    assert_eq!(
        db.number(
            "SELECT coalesce(sum(nano_usd), 0)::bigint FROM spend
             WHERE scope = 'agent' AND period = 'total'"
        ),
        10_000_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_minute_limits_hold_across_replicas_within_ten_percent() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const KEY: &str = "sk-replica-rate-0123456789";
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&db.url(), &[("agent", KEY, "requests_per_minute = 120")]);
    let replicas = start_replicas(dir.path(), &toml, &mock, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loads = load_all(&replicas, KEY, 2, &stop);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut admitted = 0;
    for load in loads {
        admitted += ok(&load.await.unwrap());
    }
    // One process would admit its burst of a minute's allowance, then 2 a second.
    let allowed = 120.0 + 2.0 * elapsed;
    eprintln!(
        "requests_per_minute = 120 over {elapsed:.1} s through 3 replicas: {admitted} admitted, one process would admit {allowed:.0}"
    );
    assert!(
        (admitted as f64) <= allowed * 1.1,
        "{admitted} admitted, more than 10 % over {allowed}"
    );
    assert!(
        (admitted as f64) >= allowed * 0.9,
        "{admitted} admitted: more than 10 % under {allowed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_loses_at_most_its_flush_window() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const KILLED: &str = "sk-replica-killed-0123456789";
    const KEPT: &str = "sk-replica-kept-0123456789";
    let db = TestDb::create();
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_replicas(dir.path(), &config(&db.url(), &[]), &mock, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let killed_load = tokio::spawn(hammer(replicas[0].url(""), KILLED, 4, Arc::clone(&stop)));
    let kept_load = tokio::spawn(hammer(replicas[1].url(""), KEPT, 4, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    replicas[0].child.kill().unwrap();
    replicas[0].child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let killed_answers = killed_load.await.unwrap();
    let kept_answers = kept_load.await.unwrap();
    let (_, _, err) = replicas.pop().unwrap().terminate();
    let kept = i64::try_from(ok(&kept_answers)).unwrap();
    let answered = i64::try_from(ok(&killed_answers)).unwrap();
    // The flush window: rows wait a flush interval (100 ms); with both cores busy (three
    // processes and the load), the writer's turn comes later: the window is measured here.
    let window = Duration::from_millis(750);
    let recent = i64::try_from(
        killed_answers
            .iter()
            .filter(|a| a.status == 200 && killed_at.duration_since(a.at) <= window)
            .count(),
    )
    .unwrap();
    let key = common::key_id(KILLED);
    let written = db.number(&format!(
        "SELECT count(*) FROM request_rows WHERE key_id = '{key}'"
    ));
    eprintln!(
        "kill -9 under load: {answered} answered, {written} written, {} lost; {recent} answered in the last {window:?}",
        answered - written
    );
    assert!(written <= answered, "nothing doubled");
    assert!(
        answered - written <= recent,
        "lost more than the last {window:?}"
    );
    let key = common::key_id(KEPT);
    assert_eq!(
        db.number(&format!(
            "SELECT count(*) FROM request_rows WHERE key_id = '{key}'"
        )),
        kept,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_and_started_under_load_loses_and_doubles_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = OwnServer::start();
    let db = TestDb::create_on(&server.url());
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_replicas(dir.path(), &config(&db.url(), &[]), &mock, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load_all(&replicas, "sk-replica-outage-0123456789", 2, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s1, s2) = (&server, &server);
    std::thread::scope(|s| s.spawn(|| s1.down()).join().unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = get_json(&replicas[0], "/stats").await;
    assert_eq!(during["ledger"]["failing"], true, "{during}");
    assert!(
        during["ledger"]["pending_rows"].as_u64().unwrap() > 0,
        "{during}"
    );
    std::thread::scope(|s| s.spawn(|| s2.up()).join().unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for load in loads {
        let answers = load.await.unwrap();
        assert!(
            answers.iter().all(|a| a.status == 200),
            "requests flow while the database is down"
        );
        answered += ok(&answers);
    }
    for replica in replicas {
        let (stopped, _, err) = replica.terminate();
        assert!(stopped, "{err}");
    }
    let answered = i64::try_from(answered).unwrap();
    let rows = wait_for_rows(&db, answered);
    eprintln!("PostgreSQL stopped 1.5 s under load: {answered} answered, {rows} rows");
    assert_eq!(rows, answered, "nothing lost, nothing doubled");
    let summed = db.number("SELECT sum(requests)::bigint FROM usage_hourly");
    assert_eq!(summed, answered, "the rollup counts each row once");
}

#[test]
fn a_ledger_url_is_checked_and_its_password_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_to_end(
        dir.path(),
        &["--ledger-url", "mysql://x@h/db", "--listen", "127.0.0.1:0"],
    );
    assert!(!ok);
    assert!(
        err.contains("ledger_url") && err.contains("postgres://"),
        "{err}"
    );
    let (ok, _, err) = run_to_end(
        dir.path(),
        &["--ledger-url", "postgres://u@h/db", "--no-persist"],
    );
    assert!(!ok);
    assert!(err.contains("needs persistence"), "{err}");
    // Nothing listens there: the error names the database without its password.
    let (ok, _, err) = run_to_end(
        dir.path(),
        &[
            "--ledger-url",
            "postgres://meter:hunter2@127.0.0.1:1/ledger",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("postgres://meter:***@127.0.0.1:1/ledger"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
