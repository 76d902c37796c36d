//! `llm-meter reprice`: stored costs recomputed from stored tokens with today's prices, through
//! the binary and its real ledger; a dry run writes nothing, a run writes costs, flags, labels
//! and totals that a restart shows.

mod common;

use std::time::Duration;

use common::{
    Binary, Mock, Received, Reply, binary_command, chat_completion, chat_request, json_lines,
    run_to_end,
};

fn answer(r: &Received) -> Reply {
    let model = r.json()["model"].as_str().expect("a model").to_owned();
    Reply::json(200, &chat_completion(&model, "x", 1_000_000, 0))
}

#[tokio::test]
async fn reprice_prices_rows_that_were_unpriced_and_a_restart_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Mock::start(answer).await;
    let start = || {
        let mut command = binary_command(dir.path());
        command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
        Binary::start(command)
    };
    let binary = start();
    for model in ["house-later", "house-later", "gpt-4o"] {
        binary
            .chat_through("sk-reprice", &chat_request(model, false))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (ok, _, _) = binary.terminate();
    assert!(ok);

    std::fs::write(
        dir.path().join("proxy.toml"),
        "[pricing.\"house-later\"]\ninput_per_million = 4.0\noutput_per_million = 4.0\n",
    )
    .unwrap();
    let (ok, dry, stderr) = run_to_end(dir.path(), &["reprice", "--dry-run"]);
    assert!(ok, "{stderr}");
    assert!(
        dry.contains("2 rows that were unpriced now have a price."),
        "{dry}"
    );
    assert!(dry.contains("Dry run: nothing was written."), "{dry}");
    let house = dry.lines().find(|l| l.starts_with("house-later")).unwrap();
    assert!(
        house.contains("$8.00") && house.contains("+$8.00"),
        "{house}"
    );
    let (_, csv, _) = run_to_end(dir.path(), &["export", "--format", "jsonl"]);
    assert!(
        json_lines(&csv)
            .iter()
            .all(|r| r["model"] != "house-later" || r["unpriced"] == true)
    );

    let (ok, wrote, stderr) = run_to_end(dir.path(), &["reprice", "--since", "2020-01-01"]);
    assert!(ok, "{stderr}");
    assert!(wrote.contains("Written in one transaction."), "{wrote}");
    let (_, rows, _) = run_to_end(dir.path(), &["export", "--format", "jsonl"]);
    let rows = json_lines(&rows);
    let house: Vec<_> = rows
        .iter()
        .filter(|r| r["model"] == "house-later")
        .collect();
    assert_eq!(house.len(), 2);
    for row in house {
        assert_eq!(row["unpriced"], false);
        assert_eq!(row["cost_usd"], 4.0);
        assert_eq!(row["price"], "proxy.toml: house-later");
    }
    // Repricing again changes nothing.
    let (_, again, _) = run_to_end(dir.path(), &["reprice"]);
    assert!(
        again.contains("0 rows that were unpriced now have a price."),
        "{again}"
    );
    let total = again.lines().find(|l| l.starts_with("TOTAL")).unwrap();
    assert!(total.trim_end().ends_with("$0.00"), "{total}");

    // A restart restores /stats from the ledger's totals: the new costs, nothing unpriced.
    let binary = start();
    let stats = binary.get_json("/stats").await;
    assert_eq!(stats["totals"]["unpriced_requests"], 0);
    let gpt4o = stats["keys"][0]["models"]["gpt-4o"]["cost_nano_usd"]
        .as_u64()
        .unwrap();
    assert_eq!(stats["totals"]["cost_nano_usd"], 8_000_000_000 + gpt4o);
}

#[test]
fn reprice_without_a_ledger_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_to_end(dir.path(), &["reprice"]);
    assert!(!ok);
    assert!(stderr.contains("ledger"), "{stderr}");
}
