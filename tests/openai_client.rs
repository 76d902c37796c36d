//! End to end through a real OpenAI client library (async-openai): chat (plain and streamed), the Responses API and embeddings; what it reports equals /stats.

#![expect(clippy::unwrap_used, reason = "request builders in test helpers")]

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use common::{Mock, Proxy, key_id};
use futures_util::StreamExt;

const KEY: &str = "sk-proj-e2e-0123456789abcdefghijklmnop";

fn client(proxy: &Proxy) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(proxy.url("/v1"))
        .with_api_key(KEY);
    Client::with_config(config).with_http_client(common::client())
}

fn request(stream_usage: Option<bool>) -> CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()
            .unwrap()
            .into()]);
    if let Some(include_usage) = stream_usage {
        args.stream_options(ChatCompletionStreamOptions {
            include_usage: Some(include_usage),
            include_obfuscation: None,
        });
    }
    args.build().unwrap()
}

#[tokio::test]
async fn plain_completion_usage_matches_stats() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = client(&proxy).chat().create(request(None)).await.unwrap();
    let usage = response.usage.expect("usage in a plain response");
    assert_eq!(
        response.choices[0].message.content.as_deref(),
        Some("Hello there!")
    );

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o-mini");
    assert_eq!(entry["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(entry["completion_tokens"], usage.completion_tokens);
    assert_eq!(entry["total_tokens"], usage.total_tokens);
}

#[tokio::test]
async fn streaming_with_include_usage_reports_the_same_usage_as_stats() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut stream = client(&proxy)
        .chat()
        .create_stream(request(Some(true)))
        .await
        .unwrap();
    let mut text = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in &chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(text, "Hello there!");
    let usage = usage.expect("the client asked for usage and got it");
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o-mini");
    assert_eq!(entry["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(entry["completion_tokens"], usage.completion_tokens);
}

#[tokio::test]
async fn streaming_without_include_usage_looks_unchanged_to_the_client_and_is_metered() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut stream = client(&proxy)
        .chat()
        .create_stream(request(None))
        .await
        .unwrap();
    let mut chunks = 0;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        // No chunk without choices and no usage: exactly what the client would see from OpenAI.
        assert!(chunk.usage.is_none());
        assert_eq!(chunk.choices.len(), 1);
        text.push_str(chunk.choices[0].delta.content.as_deref().unwrap_or(""));
        chunks += 1;
    }
    assert_eq!(chunks, 5);
    assert_eq!(text, "Hello there!");
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o-mini");
    assert_eq!(entry["prompt_tokens"], 11);
    assert_eq!(entry["completion_tokens"], 3);
    // gpt-4o-mini: 11 x $0.15/M + 3 x $0.60/M
    assert_eq!(entry["cost_nano_usd"], 3_450);
}

/// Answers the Responses API and embeddings the way OpenAI does.
fn responses_and_embeddings(request: &common::Received) -> common::Reply {
    match request.path.as_str() {
        "/v1/responses" => common::Reply::json(
            200,
            &serde_json::json!({"id": "resp_e2e", "object": "response", "created_at": 1_741_476_542,
                "status": "completed", "model": "gpt-4.1-mini-2025-04-14",
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}],
                "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 6},
                    "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 123}}),
        ),
        "/v1/embeddings" => common::Reply::json(
            200,
            &serde_json::json!({"object": "list", "model": "text-embedding-3-small",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
        ),
        _ => common::openai_like(request),
    }
}

#[tokio::test]
async fn responses_api_usage_matches_stats() {
    use async_openai::types::responses::CreateResponseArgs;
    let mock = Mock::start(responses_and_embeddings).await;
    let proxy = Proxy::start(&mock.url()).await;
    let request = CreateResponseArgs::default()
        .model("gpt-4.1-mini")
        .input("Say hello")
        .build()
        .unwrap();
    let response = client(&proxy).responses().create(request).await.unwrap();
    let usage = response.usage.expect("usage in a Responses answer");

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4.1-mini-2025-04-14");
    assert_eq!(entry["prompt_tokens"], usage.input_tokens);
    assert_eq!(
        entry["cached_tokens"],
        usage.input_tokens_details.cached_tokens
    );
    assert_eq!(entry["completion_tokens"], usage.output_tokens);
    assert_eq!(
        entry["reasoning_tokens"],
        usage.output_tokens_details.reasoning_tokens
    );
    assert_eq!(entry["total_tokens"], usage.total_tokens);
}

#[tokio::test]
async fn embeddings_usage_matches_stats() {
    use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
    let mock = Mock::start(responses_and_embeddings).await;
    let proxy = Proxy::start(&mock.url()).await;
    let request = CreateEmbeddingRequestArgs::default()
        .model("text-embedding-3-small")
        .input("The food was delicious")
        .build()
        .unwrap();
    let response = client(&proxy).embeddings().create(request).await.unwrap();
    assert_eq!(response.data[0].embedding, [0.25, -0.5]);

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "text-embedding-3-small");
    assert_eq!(entry["prompt_tokens"], response.usage.prompt_tokens);
    assert_eq!(entry["total_tokens"], response.usage.total_tokens);
    assert_eq!(entry["completion_tokens"], 0);
    assert_eq!(entry["estimated_requests"], 0);
}
