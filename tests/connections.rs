//! Connections are bounded in time and number: a head must be complete within `header_timeout`,
//! an idle keep-alive connection closes after `keepalive_timeout`, a stalled body gets 408,
//! connections past `max_connections` are refused at once, and a slowloris client never keeps a
//! normal client from being served.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Chunk, Mock, Proxy, Reply, chat_request, chat_stream, openai_like};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SHORT: &str = "header_timeout = \"1s\"\nkeepalive_timeout = \"2s\"\n";

/// Waits until the server closes `tcp` (a read gives 0 bytes or an error); returns what it read.
async fn until_closed(tcp: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    let reading = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, reading).await.ok()?;
    Some(read)
}

/// One GET /healthz on a fresh connection; its latency.
async fn health(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    started.elapsed()
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout_while_others_are_served() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start_with(&mock.url(), SHORT).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"P").await.unwrap();
        slow.push(tcp);
    }
    // One more byte of the head every 200 ms, while a normal client keeps asking.
    let drip = async {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for tcp in &mut slow {
                let _ = tcp.write_all(b"O").await;
            }
        }
    };
    let normal = async {
        let mut worst = Duration::ZERO;
        for _ in 0..15 {
            worst = worst.max(health(proxy.addr).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worst
    };
    let ((), worst) = tokio::join!(drip, normal);
    assert!(
        worst < Duration::from_millis(500),
        "a normal request took {worst:?}"
    );
    for tcp in &mut slow {
        let read = until_closed(tcp, Duration::from_secs(3)).await;
        assert!(read.is_some(), "a slow connection is still open");
    }
    let elapsed = started.elapsed();
    eprintln!(
        "200 slowloris connections all closed after {elapsed:?}; the slowest normal request took {worst:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(1),
        "closed before the timeout: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "closed late: {elapsed:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_closes_after_the_keepalive_timeout_not_the_header_one() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start_with(&mock.url(), SHORT).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_since = Instant::now();
    // Past the header timeout the connection is still usable.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "closed while idle under the keepalive timeout"
    );
    let idle_since_second = Instant::now();
    assert!(
        until_closed(&mut tcp, Duration::from_secs(4))
            .await
            .is_some()
    );
    let idle = idle_since_second.elapsed();
    assert!(
        idle >= Duration::from_millis(1_900),
        "closed after {idle:?}"
    );
    assert!(idle_since.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_stream_longer_than_both_timeouts_is_not_cut() {
    let events = chat_stream("gpt-4o", &["a", "b", "c", "d", "e"], Some((5, 5)));
    let mock = Mock::start(move |_| Reply::Stream {
        chunks: events
            .iter()
            .map(|e| Chunk {
                delay: Duration::from_millis(700),
                ..Chunk::now(e.clone())
            })
            .collect(),
        then_cut: false,
        then_hang: false,
    })
    .await;
    let proxy = Proxy::start_with(&mock.url(), SHORT).await;
    let started = Instant::now();
    let body = proxy
        .chat_through("sk-streamer-000000000", &chat_request("gpt-4o", true))
        .await;
    assert!(started.elapsed() > Duration::from_secs(3));
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 5);
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start_with(&mock.url(), SHORT).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let read = until_closed(&mut tcp, Duration::from_secs(4))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&read);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request_body_timeout"), "{response}");
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_at_once_and_served_again_below_it() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start_with(&mock.url(), "max_connections = 20\n").await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // Let the server accept them all before the one too many.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let refused = until_closed(&mut extra, Duration::from_secs(1))
        .await
        .unwrap();
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    assert!(refused.contains("too_many_connections"));
    held.truncate(10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(health(proxy.addr).await < Duration::from_secs(1));
}

#[test]
fn the_binary_raises_its_descriptor_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let command = common::binary_command(dir.path());
    // Start it under a soft limit lower than the hard one, as `ulimit -n 256` would.
    let binary = command.get_program().to_owned();
    let mut shell = std::process::Command::new("sh");
    shell
        .current_dir(dir.path())
        .env("LLM_METER_DATA_DIR", dir.path().join("data"))
        .env_remove("RUST_LOG")
        .args([
            "-c",
            "ulimit -Sn 256 && exec \"$0\" --listen 127.0.0.1:0 --no-persist",
        ])
        .arg(binary);
    let binary = common::Binary::start(shell);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", binary.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "soft and hard differ: {line}");
    let (ok, _, stderr) = binary.terminate();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("accepting connections"), "{stderr}");
    assert!(stderr.contains("max_connections"), "{stderr}");
}
