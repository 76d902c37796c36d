//! The harness itself: a panic in a test's mock upstream fails the test, and a mock stops when
//! dropped, whatever its connections are doing.

mod common;

use std::time::{Duration, Instant};

use common::{Mock, Proxy, Received, Reply, chat_request, client, openai_like};

/// A script that panics on the model `boom` and behaves like OpenAI otherwise.
fn boom_on_request(request: &Received) -> Reply {
    assert_ne!(request.json()["model"], "boom", "the mock's script panics");
    openai_like(request)
}

#[tokio::test]
#[should_panic(expected = "the mock's script panics")]
async fn a_panic_in_the_mocks_script_fails_the_test() {
    let mock = Mock::start(|_: &Received| panic!("the mock's script panics")).await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy
        .chat("sk-harness-0001", &chat_request("gpt-4o", false))
        .await;
    // The proxy saw the mock's connection close without an answer; nothing here fails the test.
    assert_eq!(response.status(), 502);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "the mock's script panics")]
async fn a_panic_in_the_mocks_script_fails_a_test_on_a_multi_thread_runtime() {
    let mock = Mock::start(|_: &Received| panic!("the mock's script panics")).await;
    let response = client()
        .post(format!("{}/chat/completions", mock.url()))
        .json(&chat_request("gpt-4o", false))
        .send()
        .await;
    assert!(response.is_err(), "{response:?}");
}

#[tokio::test]
#[should_panic(expected = "the mock's script panics")]
async fn a_panic_on_one_connection_fails_the_test_though_the_mock_serves_the_rest() {
    let mock = Mock::start(boom_on_request).await;
    let proxy = Proxy::start(&mock.url()).await;
    let boom = proxy
        .chat("sk-harness-0002", &chat_request("boom", false))
        .await;
    assert_eq!(boom.status(), 502);
    for _ in 0..3 {
        let fine = proxy
            .chat("sk-harness-0002", &chat_request("gpt-4o", false))
            .await;
        assert_eq!(fine.status(), 200);
    }
    assert_eq!(proxy.stats_after(4).await["totals"]["requests"], 4);
    proxy.stop().await;
}

#[tokio::test]
async fn a_mock_with_a_request_left_hanging_stops_when_dropped() {
    let mock = Mock::start(|_: &Received| Reply::Hang).await;
    let hung = client()
        .post(format!("{}/chat/completions", mock.url()))
        .timeout(Duration::from_millis(100))
        .json(&chat_request("gpt-4o", false))
        .send()
        .await;
    assert!(hung.is_err_and(|e| e.is_timeout()));
    assert_eq!(mock.received().len(), 1);
    // Dropped on a thread of its own, so that a drop that never returns fails here.
    let dropping = std::thread::spawn(move || drop(mock));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dropping.is_finished() {
        assert!(Instant::now() < deadline, "the mock never stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    dropping.join().unwrap();
}
