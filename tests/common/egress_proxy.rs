//! An egress proxy on loopback, as companies run one: CONNECT tunnels and plain-HTTP forward
//! requests, optionally wanting credentials, or refusing, or never answering. Every host name
//! it is asked for is this machine, so tests can name upstreams that no DNS knows.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]
#![expect(
    clippy::disallowed_methods,
    reason = "the proxy and its connections live as long as the test's runtime"
)]

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Tunnels and forwards everything.
    Open,
    /// Wants this `Proxy-Authorization` value, else 407.
    Credentials(String),
    /// Answers every CONNECT with this status line (`403 Forbidden`).
    Refuse(String),
    /// Takes the connection and never answers.
    Silent,
}

/// What one request to the proxy was.
#[derive(Debug, Clone)]
pub struct Asked {
    /// Its request line: `CONNECT api.test:443 HTTP/1.1`, `POST http://... HTTP/1.1`.
    pub line: String,
    /// Its `Proxy-Authorization`, if any.
    pub authorization: Option<String>,
}

/// The proxy; it stops with the test's runtime.
pub struct EgressProxy {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl EgressProxy {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, behaviour.clone(), Arc::clone(&log)));
            }
        });
        Self { addr, asked }
    }

    /// `http://127.0.0.1:PORT`, with `credentials` (`user:password@`) when given.
    pub fn url(&self, credentials: &str) -> String {
        format!("http://{credentials}{}", self.addr)
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().clone()
    }
}

async fn serve(mut stream: TcpStream, behaviour: Behaviour, log: Arc<Mutex<Vec<Asked>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or_default().to_owned();
    let authorization = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_owned())
    });
    log.lock().push(Asked {
        line: line.clone(),
        authorization: authorization.clone(),
    });
    let refusal = match &behaviour {
        Behaviour::Silent => {
            std::future::pending::<()>().await;
            return;
        }
        Behaviour::Refuse(status) => Some(status.clone()),
        Behaviour::Credentials(want) if authorization.as_deref() != Some(want) => {
            Some("407 Proxy Authentication Required".to_owned())
        }
        _ => None,
    };
    if let Some(status) = refusal {
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        let _ = stream.write_all(answer.as_bytes()).await;
        return;
    }
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap(), words.next().unwrap());
    // Every host is this machine; the port is the upstream's.
    let port = if method == "CONNECT" {
        target.rsplit(':').next().unwrap().to_owned()
    } else {
        let authority = target
            .split("://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        authority.rsplit(':').next().unwrap().to_owned()
    };
    let Ok(mut upstream) = TcpStream::connect(format!("127.0.0.1:{port}")).await else {
        let _ = stream
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if method == "CONNECT" {
        stream
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
    } else {
        // A forward request goes on as it came, absolute target and all (servers take it),
        // less the proxy's own credentials.
        let head: String = text
            .split_inclusive("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("proxy-authorization:"))
            .collect();
        upstream.write_all(head.as_bytes()).await.unwrap();
    }
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
}
