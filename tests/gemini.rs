//! Gemini's native API through an upstream declared with `flavor = "gemini"`: the model comes
//! from the path, usage from `usageMetadata`, and a `?key=` key counts like a header key.

mod common;

use common::{Mock, Proxy, Received, Reply, key_id};
use serde_json::{Value, json};

const KEY: &str = "AIzaSyD-gemini-test-0123456789";

fn answer(text: &str, candidates: u64, thoughts: u64) -> Value {
    json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": candidates, "thoughtsTokenCount": thoughts,
            "totalTokenCount": 10 + candidates + thoughts},
        "modelVersion": "gemini-2.5-flash", "responseId": "resp-g1"})
}

fn gemini(request: &Received) -> Reply {
    if request.path.contains(":streamGenerateContent") {
        let events: Vec<String> = [answer("Hello", 2, 30), answer(", world!", 5, 30)]
            .iter()
            .map(|chunk| format!("data: {chunk}\r\n\r\n"))
            .collect();
        return Reply::sse(&events);
    }
    Reply::json(200, &answer("Hi!", 3, 20))
}

async fn start() -> (Mock, Proxy) {
    let mock = Mock::start(gemini).await;
    let toml = format!(
        "[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"{}\"\nflavor = \"gemini\"\n",
        mock.url()
    );
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    (mock, proxy)
}

fn contents() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]})
}

#[tokio::test]
async fn generate_content_is_metered_under_the_model_in_its_path() {
    let (mock, proxy) = start().await;
    let response = proxy
        .client
        .post(proxy.url("/gemini/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("x-goog-api-key", KEY)
        .json(&contents())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.last().path,
        "/v1/models/gemini-2.5-flash:generateContent"
    );
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gemini-2.5-flash");
    assert_eq!(entry["prompt_tokens"], 10);
    // Thoughts are outside the candidates here (10 + 3 + 20 = total): both are output.
    assert_eq!(entry["completion_tokens"], 23);
    assert_eq!(entry["reasoning_tokens"], 20);
    // $0.30/M input, $2.50/M output: 10×0.3 + 23×2.5 = 60.5 millionths of a dollar.
    assert_eq!(entry["cost_nano_usd"], 60_500);
    assert_eq!(stats["by_upstream"]["gemini"]["requests"], 1);
}

#[tokio::test]
async fn a_streamed_answer_counts_its_last_running_total() {
    let (_mock, proxy) = start().await;
    let response = proxy
        .client
        .post(proxy.url("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", KEY)
        .json(&contents())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("data: ").count(), 2);
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gemini-2.5-flash");
    assert_eq!(entry["completion_tokens"], 35);
    assert_eq!(entry["prompt_tokens"], 10);
}

#[tokio::test]
async fn a_query_key_is_the_same_caller_as_the_header_key_and_never_stored() {
    let (mock, proxy) = start().await;
    let response = proxy
        .client
        .post(proxy.url(&format!(
            "/gemini/v1beta/models/gemini-2.5-flash:generateContent?key={KEY}"
        )))
        .json(&contents())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Forwarded as the client sent it: the upstream needs the key.
    assert!(mock.last().path.contains("models/gemini-2.5-flash"));
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["keys"][0]["id"], key_id(KEY));
    assert!(!stats.to_string().contains(KEY));
}
