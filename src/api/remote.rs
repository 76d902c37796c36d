//! Asking a running llm-meter from the command line, with no curl: `healthcheck` (its
//! `/healthz`) and `stats` (its `/stats?format=text`, once or refreshed until Ctrl-C). One
//! blocking HTTP/1.1 GET per question, on a connection of its own.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use super::HEALTHZ;
use crate::config::Config;

/// The totals table, as `/stats?format=text` writes it.
pub const STATS_TEXT: &str = "/stats?format=text";
/// How often `stats --watch` refreshes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Longest one question may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read; `/stats` of the largest meter is well under it.
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;
/// Moves the cursor home and clears the screen (ANSI).
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Why a running llm-meter could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Nothing accepted the connection.
    #[error("cannot connect to {addr}: {source} (is llm-meter running there?)")]
    Connect {
        /// The address asked.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The request could not be sent, or no whole answer came in time.
    #[error("no answer from {addr}: {source}")]
    NoAnswer {
        /// The address asked.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// It answered, but not 200.
    #[error("{addr} answered {status}{detail}")]
    Status {
        /// The address asked.
        addr: SocketAddr,
        /// Its status line's code and reason.
        status: String,
        /// `: ` and what its error body says, or nothing.
        detail: String,
    },
    /// The admin token cannot be sent in a header.
    #[error("the admin token has a control character: it cannot be sent")]
    BadToken,
    /// The table could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// The address a command reaches a server listening on `addr` at: a wildcard address
/// (`0.0.0.0`, `::`) is reached through loopback.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Asks a running llm-meter's `/healthz` (for container health checks, where no curl exists).
pub fn probe_health(addr: SocketAddr, timeout: Duration) -> Result<(), RemoteError> {
    get(addr, HEALTHZ, None, timeout).map(drop)
}

/// Where `stats` asks, and with what: the own endpoints' address (`admin_listen`, else
/// `listen`) and the admin token, both from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StatsSource<'a> {
    /// The address asked.
    pub addr: SocketAddr,
    /// The admin token, when one is set.
    pub token: Option<&'a str>,
}

impl<'a> StatsSource<'a> {
    /// The source `config` names.
    pub fn of(config: &'a Config) -> Self {
        Self {
            addr: reachable(config.admin_listen.unwrap_or(config.listen)),
            token: config.admin_token.as_ref().map(|t| t.expose()),
        }
    }

    /// The totals table, as `/stats?format=text` writes it.
    pub fn table(&self) -> Result<String, RemoteError> {
        get(self.addr, STATS_TEXT, self.token, TIMEOUT)
    }

    /// Writes the table to `out` every `every`, until the process is stopped or `out` fails:
    /// on a terminal the screen is cleared before each, elsewhere a separator line comes
    /// between them. A first failure ends it; once a table was shown, a failure is shown in
    /// its place and the next refresh tries again (the server may be restarting).
    pub fn watch(
        &self,
        out: &mut impl Write,
        is_terminal: bool,
        every: Duration,
    ) -> Result<(), RemoteError> {
        let mut shown = false;
        loop {
            let table = match self.table() {
                Ok(table) => table,
                Err(err) if shown => format!("llm-meter: {err}\n"),
                Err(err) => return Err(err),
            };
            let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC");
            if is_terminal {
                write!(
                    out,
                    "{CLEAR_SCREEN}llm-meter stats of http://{} every {}s (Ctrl-C to stop), {now}\n\n",
                    self.addr,
                    every.as_secs()
                )?;
            } else if shown {
                writeln!(out, "--- {now} ---")?;
            }
            out.write_all(table.as_bytes())?;
            out.flush()?;
            shown = true;
            std::thread::sleep(every);
        }
    }
}

/// GETs `path` of the llm-meter at `addr` (with the admin token, when given) and returns the
/// body of a 200 answer.
pub fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<String, RemoteError> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        if token.chars().any(char::is_control) {
            return Err(RemoteError::BadToken);
        }
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| RemoteError::Connect { addr, source })?;
    let no_answer = |source| RemoteError::NoAnswer { addr, source };
    stream.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_answer)?;
    stream.write_all(request.as_bytes()).map_err(no_answer)?;
    // `Connection: close`: the answer ends where the stream does.
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .map_err(no_answer)?;
    let (status, body) = parse_answer(&answer).ok_or_else(|| {
        no_answer(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP answer",
        ))
    })?;
    if status.starts_with("200") {
        Ok(body)
    } else {
        Err(RemoteError::Status {
            addr,
            detail: detail_of(&status, &body),
            status,
        })
    }
}

/// The status (`200 OK`) and body of an HTTP/1.x answer; a chunked body is put back together.
fn parse_answer(answer: &[u8]) -> Option<(String, String)> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let body = &answer[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .get(2..)?
        .trim()
        .to_owned();
    let is_chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if is_chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The data of a chunked body (RFC 9112, section 7.1); `None` when it is cut or malformed.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = size.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// What an error answer says, for the one line: its JSON error's message, and what to do
/// about a refused token.
fn detail_of(status: &str, body: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .map(|m| m.trim_start_matches("llm-meter: ").to_owned());
    let hint = status
        .starts_with("401")
        .then_some("set LLM_METER_ADMIN_TOKEN or admin_token to the server's token");
    match (message, hint) {
        (Some(message), Some(hint)) => format!(": {message} ({hint})"),
        (Some(message), None) => format!(": {message}"),
        (None, Some(hint)) => format!(" ({hint})"),
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_whole_or_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            parse_answer(plain),
            Some(("200 OK".to_owned(), "hello".to_owned()))
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(
            parse_answer(chunked),
            Some(("200 OK".to_owned(), "hello, world".to_owned()))
        );
        let cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nhel";
        assert_eq!(parse_answer(cut), None);
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn a_refused_token_says_what_to_set() {
        let body = r#"{"error":{"message":"llm-meter: admin token required","type":"x"}}"#;
        assert_eq!(
            detail_of("401 Unauthorized", body),
            ": admin token required (set LLM_METER_ADMIN_TOKEN or admin_token to the server's token)"
        );
        assert_eq!(detail_of("404 Not Found", "nope"), "");
        assert_eq!(
            detail_of("400 Bad Request", r#"{"error":{"message":"bad"}}"#),
            ": bad"
        );
    }

    #[test]
    fn wildcard_addresses_are_reached_through_loopback() {
        for (listen, reached) in [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:9", "[::1]:9"),
            ("10.1.2.3:80", "10.1.2.3:80"),
        ] {
            assert_eq!(reachable(listen.parse().unwrap()).to_string(), reached);
        }
    }
}
