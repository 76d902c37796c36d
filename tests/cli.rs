//! The binary: help, one-line errors for bad input, layer precedence, startup line, shutdown
//! summary, and `stats` asking a running one.

mod common;

use std::process::Output;

use common::{Binary, Mock, binary_command, chat_request, ledger_row};

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary_command(dir);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the binary runs")
}

/// Asserts a failed start: exit code 2 and exactly one line on stderr containing every `needle`.
fn assert_one_line_error(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
    assert!(output.stdout.is_empty());
}

#[test]
fn help_explains_every_option() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--config",
        "--listen",
        "--upstream",
        "--log-format",
        "LLM_METER_LISTEN",
        "LLM_METER_UPSTREAM",
        "LLM_METER_CONFIG",
        "proxy.toml",
        "RUST_LOG",
        "healthcheck",
        "stats",
        "serve",
    ] {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
}

#[test]
fn a_bad_flag_exits_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_one_line_error(&run(dir.path(), &["--bogus"], &[]), &["--bogus"]);
    assert_one_line_error(
        &run(dir.path(), &["--listen", "not-an-address"], &[]),
        &["`listen`", "not-an-address", "flag"],
    );
    assert_one_line_error(
        &run(dir.path(), &["--upstream", "api.openai.com"], &[]),
        &["`upstream`"],
    );
    assert_one_line_error(
        &run(dir.path(), &["--log-format", "xml"], &[]),
        &["`log_format`"],
    );
    assert_one_line_error(
        &run(dir.path(), &[], &[("LLM_METER_UPSTREAM", "ftp://x")]),
        &["LLM_METER_UPSTREAM"],
    );
}

#[test]
fn bad_toml_unknown_fields_and_bad_values_exit_with_one_line_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    for (text, needles) in [
        ("listen = \n", &["proxy.toml line 1"][..]),
        (
            "# ok\nlisten_addr = \"127.0.0.1:1\"\n",
            &["line 2", "listen_addr"],
        ),
        (
            "[pricing.\"m\"]\ninput_per_million = 1.0\n",
            &["output_per_million"],
        ),
        (
            "[pricing.\"m\"]\ninput_per_million = \"cheap\"\noutput_per_million = 1.0\n",
            &["pricing.\"m\".input_per_million"],
        ),
        ("connect_timeout = \"fast\"\n", &["connect_timeout"]),
        ("max_body_bytes = 0\n", &["max_body_bytes"]),
    ] {
        std::fs::write(&file, text).unwrap();
        assert_one_line_error(&run(dir.path(), &[], &[]), needles);
    }
    assert_one_line_error(
        &run(dir.path(), &["--config", "missing.toml"], &[]),
        &["missing.toml"],
    );
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        "listen = \"256.0.0.1:1\"\nupstream = \"http://from-file.test/v1\"\n",
    )
    .unwrap();
    // The file's bad listen address is never used: the environment's wins.
    let mut command = binary_command(dir.path());
    command.env("LLM_METER_LISTEN", "127.0.0.1:0");
    let binary = Binary::start(command);
    assert!(
        binary
            .banner
            .contains("forwarding /v1 to http://from-file.test/v1"),
        "{}",
        binary.banner
    );
    drop(binary);

    let mut command = binary_command(dir.path());
    command
        .env("LLM_METER_LISTEN", "127.0.0.1:0")
        .env("LLM_METER_UPSTREAM", "http://from-env.test/v1");
    let binary = Binary::start(command);
    assert!(
        binary.banner.contains("http://from-env.test/v1"),
        "{}",
        binary.banner
    );
    drop(binary);

    let mut command = binary_command(dir.path());
    command
        .args([
            "--upstream",
            "http://from-flag.test/v1",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("LLM_METER_LISTEN", "256.0.0.1:2")
        .env("LLM_METER_UPSTREAM", "http://from-env.test/v1");
    let binary = Binary::start(command);
    assert!(
        binary.banner.contains("http://from-flag.test/v1"),
        "{}",
        binary.banner
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_line_then_sigterm_prints_the_totals() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &mock.url(),
    ]);
    let binary = Binary::start(command);
    assert!(
        binary
            .banner
            .starts_with("llm-meter listening on http://127.0.0.1:"),
        "{}",
        binary.banner
    );
    assert!(
        binary
            .banner
            .contains(&format!("forwarding /v1 to {}", mock.url()))
    );

    let client = common::client();
    let response = client
        .post(binary.url("/v1/chat/completions"))
        .bearer_auth("sk-bin")
        .json(&chat_request("gpt-4o", true))
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap();

    let mut health = binary_command(dir.path());
    health.args(["healthcheck", "--listen", &binary.addr.to_string()]);
    assert!(health.status().unwrap().success());

    let (ok, stdout, _) = binary.terminate();
    assert!(ok);
    assert_eq!(
        stdout.trim_end(),
        "llm-meter stopped. 1 request, 0 errors | tokens: 11 in + 3 out | cost: $0.0000575"
    );
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = run(
        dir.path(),
        &["healthcheck", "--listen", &format!("127.0.0.1:{port}")],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unhealthy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_json_object_per_line() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &mock.url(),
        "--log-format",
        "json",
    ]);
    let binary = Binary::start(command);
    common::client()
        .post(binary.url("/v1/chat/completions"))
        .json(&chat_request("gpt-4o", false))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (_, _, stderr) = binary.terminate();
    let lines = common::json_lines(&stderr);
    let request = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request")
        .unwrap_or_else(|| panic!("no request line in {stderr}"));
    assert_eq!(request["fields"]["status"], 200);
    assert_eq!(request["fields"]["tokens_in"], 11);
    assert_eq!(request["fields"]["model"], "gpt-4o");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_kept_alive_connection_gets_its_one_log_line() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    // One client: its requests share a connection, whose lines wait for each poll to end.
    let client = common::client();
    let streams = [false, true, false, true, false];
    for stream in streams {
        let answer = client
            .post(binary.url("/v1/chat/completions"))
            .json(&chat_request("gpt-4o", stream))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
    }
    let (_, _, stderr) = binary.terminate();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("llm_meter::proxy: request "))
        .collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    for (line, stream) in lines.iter().zip(streams) {
        assert!(line.contains(&format!("stream={stream} ")), "{line}");
        assert!(
            line.contains("status=200 ") && line.contains("tokens_in=11 "),
            "{line}"
        );
    }
}

/// The options a `--help` lists, in order.
fn options_in_help(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let output = run(dir.path(), args, &[]);
    assert!(output.status.success(), "{args:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split(' ').find(|word| word.starts_with("--")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_command_lists_only_its_own_options() {
    let serving = [
        "--config",
        "--listen",
        "--admin-listen",
        "--upstream",
        "--log-format",
        "--threads",
        "--data-dir",
        "--no-persist",
        "--pricing-file",
        "--ledger-url",
        "--help",
    ];
    assert_eq!(
        options_in_help(&["--help"]),
        [&serving[..], &["--version"]].concat()
    );
    assert_eq!(options_in_help(&["serve", "--help"]), serving);
    assert_eq!(
        options_in_help(&["report", "--help"]),
        [
            "--config",
            "--data-dir",
            "--ledger-url",
            "--period",
            "--by",
            "--since",
            "--until",
            "--format",
            "--where",
            "--help"
        ]
    );
    assert_eq!(
        options_in_help(&["export", "--help"]),
        [
            "--config",
            "--data-dir",
            "--ledger-url",
            "--format",
            "--since",
            "--until",
            "--where",
            "--help"
        ]
    );
    assert_eq!(
        options_in_help(&["healthcheck", "--help"]),
        ["--config", "--listen", "--help"]
    );
    assert_eq!(
        options_in_help(&["stats", "--help"]),
        [
            "--config",
            "--listen",
            "--admin-listen",
            "--watch",
            "--help"
        ]
    );
}

#[test]
fn serving_flags_work_with_and_without_serve_but_not_with_other_commands() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--listen", "127.0.0.1:0", "--no-persist"][..],
        &["serve", "--listen", "127.0.0.1:0", "--no-persist"],
    ] {
        let mut command = binary_command(dir.path());
        command.args(args);
        let binary = Binary::start(command);
        assert!(binary.banner.contains("not persisted"), "{}", binary.banner);
    }
    assert_one_line_error(
        &run(
            dir.path(),
            &["report", "--upstream", "http://x.test/v1"],
            &[],
        ),
        &["--upstream"],
    );
    assert_one_line_error(
        &run(dir.path(), &["export", "--threads", "2"], &[]),
        &["--threads"],
    );
}

#[test]
fn report_and_export_read_the_ledger_their_data_dir_names() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    common::write_ledger(
        &elsewhere,
        [ledger_row(
            "2026-11-02T08:00:00Z",
            "sk-a",
            "gpt-4o",
            (10, 2),
            7950,
        )],
    );
    let data_dir = elsewhere.to_str().unwrap();
    let report = run(
        dir.path(),
        &["report", "--period", "all", "--data-dir", data_dir],
        &[],
    );
    assert!(report.status.success(), "{report:?}");
    assert!(String::from_utf8_lossy(&report.stdout).contains("gpt-4o"));
    let export = run(
        dir.path(),
        &["export", "--format", "jsonl", "--data-dir", data_dir],
        &[],
    );
    assert!(export.status.success(), "{export:?}");
    assert_eq!(
        common::json_lines(&String::from_utf8_lossy(&export.stdout)).len(),
        1
    );
}

#[test]
fn by_help_names_every_dimension_report_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let help = String::from_utf8(run(dir.path(), &["report", "--help"], &[]).stdout).unwrap();
    let by = help
        .lines()
        .find(|l| l.trim_start().starts_with("--by"))
        .unwrap();
    for dimension in ["day", "hour", "model", "key", "upstream"] {
        assert!(
            llm_meter::meter::ledger::history::Group::parse(dimension).is_ok(),
            "{dimension}"
        );
        assert!(by.contains(dimension), "{dimension} missing from {by:?}");
    }
}

#[test]
fn bad_report_and_export_options_are_usage_errors_exiting_2() {
    let dir = tempfile::tempdir().unwrap();
    common::write_ledger(&dir.path().join("data"), []);
    for (args, needles) in [
        (
            &["report", "--period", "year"][..],
            &["--period", "year", "today, week, month, all"][..],
        ),
        (&["report", "--by", "week"], &["--by", "week"]),
        (&["report", "--by", "day,day"], &["--by", "twice"]),
        (
            &["report", "--since", "yesterday"],
            &["--since", "yesterday"],
        ),
        (&["report", "--until", "soon"], &["--until", "soon"]),
        (
            &["export", "--format", "xml"],
            &["--format", "xml", "csv, jsonl"],
        ),
        (&["export", "--since", "last week"], &["--since"]),
        (&["export", "--until", "tomorrow"], &["--until"]),
    ] {
        assert_one_line_error(&run(dir.path(), args, &[]), needles);
    }
    // A ledger that cannot be read is not a usage error.
    let empty = tempfile::tempdir().unwrap();
    for command in ["report", "export"] {
        let output = run(empty.path(), &[command], &[]);
        assert_eq!(output.status.code(), Some(1), "{command}: {output:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_json_is_usage_json_for_the_same_range_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    common::write_ledger(
        &dir.path().join("data"),
        [
            ledger_row(
                "2026-11-01T10:00:00Z",
                "sk-a",
                "gpt-4o",
                (1000, 200),
                4_500_000,
            ),
            ledger_row(
                "2026-11-02T08:00:00Z",
                "sk-b",
                "gpt-4o-mini",
                (500, 50),
                417_500,
            ),
            ledger_row(
                "2026-11-02T09:00:00Z",
                "sk-a",
                "gpt-4o",
                (1000, 200),
                4_500_000,
            ),
            ledger_row("2026-11-03T09:00:00Z", "sk-a", "gpt-4o", (1, 1), 1),
        ],
    );
    let range = ["--since", "2026-11-01", "--until", "2026-11-03"];
    let output = run(
        dir.path(),
        &[
            &["report", "--format", "json", "--by", "model,key"][..],
            &range,
        ]
        .concat(),
        &[],
    );
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["group_by"], serde_json::json!(["model", "key"]));
    assert_eq!(report["since"], "2026-11-01T00:00:00Z");
    assert_eq!(report["until"], "2026-11-03T00:00:00Z");
    assert_eq!(report["totals"]["requests"], 3);
    assert_eq!(report["totals"]["cost_nano_usd"], 9_417_500);
    // The most expensive first, as in the table.
    assert_eq!(report["rows"][0]["model"], "gpt-4o");
    assert_eq!(report["rows"][0]["requests"], 2);
    assert_eq!(report["rows"][1]["key_id"], common::key_id("sk-b"));

    let mut command = binary_command(dir.path());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    let binary = Binary::start(command);
    let mut usage = binary
        .get_json("/usage?group_by=model,key&since=2026-11-01&until=2026-11-03")
        .await;
    let by_cost = |rows: &mut serde_json::Value| {
        let rows = rows.as_array_mut().unwrap();
        rows.sort_by_key(|r| std::cmp::Reverse(r["cost_nano_usd"].as_u64()));
    };
    by_cost(&mut usage["rows"]);
    assert_eq!(report, usage);

    let empty = run(
        dir.path(),
        &[
            "report",
            "--format",
            "json",
            "--since",
            "2020-01-01",
            "--until",
            "2020-01-02",
        ],
        &[],
    );
    let empty: serde_json::Value = serde_json::from_slice(&empty.stdout).unwrap();
    assert_eq!(empty["rows"], serde_json::json!([]));
    assert_eq!(empty["totals"]["requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_of_one_are_written_in_the_singular() {
    let mock = Mock::start(|_| common::Reply::json(500, &serde_json::json!({"error": {}}))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    binary
        .chat_through("sk-one", &chat_request("gpt-4o", false))
        .await;
    let text = raw_body(&binary, "/stats?format=text").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in lines {
        assert!(
            line.contains(": 1 request, 1 error | tokens: 0 in + 0 out"),
            "{line}"
        );
    }
    let (_, stdout, _) = binary.terminate();
    assert!(
        stdout.starts_with("llm-meter stopped. 1 request, 1 error |"),
        "{stdout}"
    );

    let data = dir.path().join("report");
    let unpriced = llm_meter::meter::ledger::Row {
        is_unpriced: true,
        ..ledger_row("2026-11-02T08:00:00Z", "sk-a", "my-llama", (10, 2), 0)
    };
    let estimated = llm_meter::meter::ledger::Row {
        is_estimated: true,
        ..ledger_row("2026-11-02T09:00:00Z", "sk-a", "gpt-4o", (10, 2), 55_000)
    };
    common::write_ledger(&data, [unpriced, estimated]);
    let report = report_all(dir.path(), &data);
    assert!(
        report.contains(
            "\n1 request was to a model without a price: its tokens are counted, its cost is not (COST: unknown, or +? after the part that is known)\n"
        ),
        "{report}"
    );
    assert!(
        report.ends_with(
            "\n1 request reported no usage: its tokens were counted by a tokenizer (estimated)\n"
        ),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_views_write_costs_to_four_significant_digits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("report");
    common::write_ledger(
        &data,
        [
            ledger_row("2026-11-02T08:00:00Z", "sk-a", "model-a", (1, 1), 417_500),
            ledger_row("2026-11-02T08:00:01Z", "sk-a", "model-b", (1, 1), 408_600),
            ledger_row("2026-11-02T08:00:02Z", "sk-a", "model-c", (1, 1), 68_000),
            ledger_row(
                "2026-11-02T08:00:03Z",
                "sk-a",
                "model-d",
                (1, 1),
                1_234_500_000,
            ),
        ],
    );
    let report = report_all(dir.path(), &data);
    let costs: Vec<&str> = report
        .lines()
        .skip(2)
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        costs,
        ["$1.235", "$0.0004175", "$0.0004086", "$0.000068", "$1.235"],
        "{report}"
    );

    // /stats?format=text, its budget line, and the shutdown line: two requests of $0.0000575.
    let mock = Mock::openai().await;
    std::fs::write(dir.path().join("proxy.toml"), "[budget]\ndaily_usd = 1.0\n").unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    for _ in 0..2 {
        binary
            .chat_through("sk-two", &chat_request("gpt-4o", false))
            .await;
    }
    let text = raw_body(&binary, "/stats?format=text").await;
    let total = text.lines().last().unwrap();
    assert!(
        total.ends_with("| cost: $0.000115 | budget left: daily $0.9999 of $1.00"),
        "{text}"
    );
    let (_, stdout, _) = binary.terminate();
    assert!(stdout.trim_end().ends_with("| cost: $0.000115"), "{stdout}");
}

/// The raw text of a GET (the form of its numbers is what is tested, so not parsed first).
async fn raw_body(binary: &Binary, path: &str) -> String {
    common::client()
        .get(binary.url(path))
        .send()
        .await
        .expect("an answer")
        .text()
        .await
        .expect("a text body")
}

/// Asserts `text` writes the cost of 7950 nano-dollars as a plain decimal, never `7.95e-6`.
fn assert_plain_cost(text: &str, written: &str) {
    assert!(text.contains(written), "{written} not in {text}");
    assert!(!text.contains("e-6"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_costs_are_plain_decimals_in_logs_and_json() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    // 11 prompt tokens at $0.45 and 3 completion tokens at $1 per million: $0.00000795.
    std::fs::write(
        dir.path().join("proxy.toml"),
        "[pricing.\"m\"]\ninput_per_million = 0.45\noutput_per_million = 1.0\n",
    )
    .unwrap();
    for log_format in ["text", "json"] {
        let mut command = binary_command(dir.path());
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
            "--log-format",
            log_format,
        ]);
        let binary = Binary::start(command);
        binary
            .chat_through("sk-small", &chat_request("m", false))
            .await;
        if log_format == "text" {
            let stats = raw_body(&binary, "/stats").await;
            let parsed: serde_json::Value = serde_json::from_str(&stats).unwrap();
            assert_eq!(parsed["totals"]["cost_nano_usd"], 7950);
            assert_plain_cost(&stats, r#""cost_usd":0.00000795,"#);
            let usage = raw_body(&binary, "/usage?group_by=model").await;
            assert_plain_cost(&usage, r#""cost_usd":0.00000795,"#);
            let export = raw_body(&binary, "/export?format=jsonl").await;
            assert_plain_cost(&export, r#""cost_usd":0.00000795,"#);
        }
        let (_, _, stderr) = binary.terminate();
        let line = stderr
            .lines()
            .find(|l| l.contains("\"m\""))
            .unwrap_or_else(|| panic!("no request line in {stderr}"));
        let written = match log_format {
            "text" => " cost_usd=0.00000795 ",
            _ => r#""cost_usd":0.00000795,"#,
        };
        assert_plain_cost(line, written);
    }
}

#[test]
fn report_and_export_without_persistence_name_the_setting_they_read() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["report", "export"] {
        let output = run(dir.path(), &[command], &[("LLM_METER_PERSIST", "false")]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("LLM_METER_PERSIST=false"), "{stderr}");
        assert!(!stderr.contains("--no-persist"), "{stderr}");
    }
}

/// `llm-meter report --period all` over the ledger in `data`, its standard output.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: a failure is a failed test"
)]
fn report_all(dir: &std::path::Path, data: &std::path::Path) -> String {
    let report = run(
        dir,
        &[
            "report",
            "--period",
            "all",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    String::from_utf8(report.stdout).unwrap()
}

/// Asserts a failed command: exit code 1 and exactly one line on stderr containing every `needle`.
fn assert_one_line_failure(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
    assert!(output.stdout.is_empty());
}

/// A binary serving provider routes on one address and its own endpoints on another (the
/// second address of its startup line), with `admin_token = "s3cret"` in its proxy.toml.
fn start_with_admin_listen(dir: &std::path::Path, mock: &Mock) -> (Binary, String) {
    std::fs::write(dir.join("proxy.toml"), "admin_token = \"s3cret\"\n").expect("a proxy.toml");
    let mut command = binary_command(dir);
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        &mock.url(),
        "--no-persist",
    ]);
    let binary = Binary::start(command);
    let admin = binary
        .banner
        .split("own endpoints on http://")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("the own endpoints' address in the startup line")
        .to_owned();
    (binary, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_prints_what_stats_text_of_the_running_server_says() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, admin) = start_with_admin_listen(dir.path(), &mock);
    for key in ["sk-first-key-0001", "sk-second-key-0002"] {
        binary
            .chat_through(key, &chat_request("gpt-4o", false))
            .await;
    }
    let expected = common::client()
        .get(format!("http://{admin}/stats?format=text"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(expected.lines().count(), 3, "{expected}");
    assert!(expected.contains("2 requests"), "{expected}");

    // The token comes from the same proxy.toml; the own endpoints' address is asked.
    let listen = binary.addr.to_string();
    let output = run(
        dir.path(),
        &["stats", "--listen", &listen, "--admin-listen", &admin],
        &[],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);

    // The environment's token comes first: a wrong one is refused, and said so in one line.
    let refused = run(
        dir.path(),
        &["stats", "--admin-listen", &admin],
        &[("LLM_METER_ADMIN_TOKEN", "wrong")],
    );
    assert_one_line_failure(&refused, &["401", "LLM_METER_ADMIN_TOKEN"]);
    assert!(!String::from_utf8_lossy(&refused.stderr).contains("wrong"));
}

#[test]
fn stats_fails_with_one_line_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    for args in [
        &["stats", "--listen", &addr][..],
        &["stats", "--watch", "--listen", &addr],
    ] {
        let output = run(dir.path(), args, &[]);
        assert_one_line_failure(
            &output,
            &[&format!("cannot connect to {addr}"), "is llm-meter running"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_watch_refreshes_every_two_seconds_with_a_separator_off_a_terminal() {
    use std::io::BufRead;
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, admin) = start_with_admin_listen(dir.path(), &mock);
    binary
        .chat_through("sk-watched-0001", &chat_request("gpt-4o", false))
        .await;
    let mut watch = binary_command(dir.path())
        .args(["stats", "--watch", "--admin-listen", &admin])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let sink = std::sync::Arc::clone(&lines);
    let stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            sink.lock().push(line);
        }
    });
    let tables = || {
        lines
            .lock()
            .iter()
            .filter(|l| l.starts_with("total since "))
            .count()
    };
    let started = std::time::Instant::now();
    while tables() < 2 && started.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Stopped by its process id, as Ctrl-C would.
    watch.kill().unwrap();
    watch.wait().unwrap();
    let lines = lines.lock().clone();
    assert!(tables() >= 2, "{lines:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(1900));
    // table, separator, table: no escape codes off a terminal.
    assert!(lines[0].starts_with("sk-"), "{lines:?}");
    assert!(lines[1].starts_with("total since "), "{lines:?}");
    assert!(
        lines[2].starts_with("--- ") && lines[2].ends_with(" UTC ---"),
        "{lines:?}"
    );
    assert_eq!(lines[3..5], lines[..2]);
    assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:?}");
}
