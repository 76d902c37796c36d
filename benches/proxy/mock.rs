//! The benchmark's upstream: a minimal hyper server answering chat completions as fast as it can.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Tokens the mock reports for every request.
pub const PROMPT_TOKENS: u64 = 57;
pub const COMPLETION_TOKENS: u64 = 21;
/// Content chunks in a streamed answer.
pub const STREAM_CHUNKS: usize = 20;

/// A prompt containing this is answered with its events spaced out, as a model makes tokens.
pub const TRICKLE_MARK: &str = "trickle";

/// The gap between trickled events.
const TRICKLE_GAP: std::time::Duration = std::time::Duration::from_millis(1);

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves forever on `listener` (run in its own process by the benchmark).
pub async fn serve(listener: TcpListener) {
    serve_with(listener, None).await;
}

/// TLS settings with a certificate for `localhost` from a CA made now, whose certificate is
/// written to `dir/ca.pem` for llm-meter to trust; ALPN offers HTTP/2, then HTTP/1.1.
pub fn tls_acceptor(dir: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem written");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("a key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("parameters")
        .signed_by(&key, &issuer)
        .expect("the certificate");
    let chain = vec![rustls::pki_types::CertificateDer::from(leaf.der().to_vec())];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the certificate taken");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// Serves forever on `listener` behind TLS, in HTTP/2 or HTTP/1.1 as ALPN chose.
pub async fn serve_tls(listener: TcpListener, tls: tokio_rustls::TlsAcceptor) {
    serve_with(listener, Some(tls)).await;
}

/// Serves forever: plain HTTP/1.1, or behind `tls` in what its ALPN chose.
async fn serve_with(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let plain = Bytes::from(plain_body());
    let (stream_with_usage, stream_without) = (stream_events(true), stream_events(false));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let plain = plain.clone();
        let (with, without) = (stream_with_usage.clone(), stream_without.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (plain, with, without) = (plain.clone(), with.clone(), without.clone());
                async move { Ok::<_, Infallible>(answer(request, plain, with, without).await) }
            });
            match tls {
                None => {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                }
                Some(tls) => {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                }
            }
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    plain: Bytes,
    with: Vec<Bytes>,
    without: Vec<Bytes>,
) -> Response<Body> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let is_stream = memchr::memmem::find(&body, b"\"stream\":true").is_some();
    if !is_stream {
        return Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(plain).boxed())
            .unwrap_or_default();
    }
    let wants_usage = memchr::memmem::find(&body, b"\"include_usage\":true").is_some();
    let events = if wants_usage { with } else { without };
    let is_trickle = memchr::memmem::find(&body, TRICKLE_MARK.as_bytes()).is_some();
    // The role, content and finish events are spaced out; usage and `[DONE]` follow at once, so
    // the usage chunk a proxy asks for adds no gap.
    let frames = futures_util::StreamExt::then(
        futures_util::stream::iter(events.into_iter().enumerate()),
        move |(i, event)| async move {
            if is_trickle && i < STREAM_CHUNKS + 2 {
                tokio::time::sleep(TRICKLE_GAP).await;
            }
            Ok::<_, Infallible>(Frame::data(event))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(frames).boxed())
        .unwrap_or_default()
}

fn plain_body() -> String {
    format!(
        r#"{{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"This is a short benchmark answer of about twenty tokens, as agents often get.","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{COMPLETION_TOKENS},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0}}}},"system_fingerprint":"fp_bench"}}"#,
        PROMPT_TOKENS + COMPLETION_TOKENS
    )
}

fn stream_events(with_usage: bool) -> Vec<Bytes> {
    let usage_null = if with_usage { r#","usage":null"# } else { "" };
    let chunk = |delta: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage_null}}}\n\n"
        ))
    };
    let mut events = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
    for i in 0..STREAM_CHUNKS {
        events.push(chunk(&format!(r#"{{"content":" token{i}"}}"#), "null"));
    }
    events.push(chunk("{}", "\"stop\""));
    if with_usage {
        events.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\"completion_tokens\":{COMPLETION_TOKENS},\"total_tokens\":{}}}}}\n\n",
            PROMPT_TOKENS + COMPLETION_TOKENS
        )));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}
