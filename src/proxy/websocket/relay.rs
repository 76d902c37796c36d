//! The relay of one upgraded connection: each message handed to the other side as it arrives
//! (text, binary, ping, pong, close), the upstream's text read for usage on the way, until a
//! side closes, a limit is reached or the service shuts down; then both sides are closed.
//!
//! Framing is tungstenite's, over the two upgraded connections: the server role towards the
//! client, the client role (masked frames) towards the upstream. tungstenite answers a ping
//! itself; the ping is also passed on, so a side may see an extra pong, which RFC 6455 allows.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::turns::{Admission, Refused, Turns};
use crate::config::websocket::Settings;
use crate::guard::Refusal;
use crate::proxy::tap::Outcome;
use crate::tasks::Tasks;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How long a side gets to answer a close frame before its connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Longest close reason a close frame may carry (RFC 6455 §5.5: 125 bytes, 2 for the code).
const MAX_REASON: usize = 123;

/// One upgraded connection, waiting for both upgrades to complete.
pub(super) struct Session {
    /// Its responses, metered as they pass.
    pub(super) turns: Turns,
    /// Its limits.
    pub(super) limits: Settings,
    /// Says when the service shuts down.
    pub(super) tasks: Tasks,
}

/// A side of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Why the relay stopped.
enum End {
    /// A side sent a close frame, to be passed to the other.
    Closed(Side, Option<CloseFrame>),
    /// A side's connection ended or failed without a close frame.
    Lost(Side, String),
    /// llm-meter closes both sides: a refusal, a limit, the shutdown.
    Close(CloseCode, String, Outcome),
}

/// What woke the relay.
enum Event {
    Message(Side, Option<Result<Message, WsError>>),
    Idle,
    TooLong,
    Shutdown,
}

impl Session {
    /// Waits for both upgrades, relays until the end, closes both sides, and records the
    /// responses still open as partial.
    pub(super) async fn run(self, on_client: OnUpgrade, on_upstream: OnUpgrade) {
        let Self {
            mut turns,
            limits,
            tasks,
        } = self;
        let (client, upstream) = match tokio::join!(on_client, on_upstream) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (client, upstream) => {
                let err = client.err().or(upstream.err()).map(|e| e.to_string());
                turns.finish(Outcome::ClientGone, err);
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_message_bytes));
        let mut client =
            WebSocketStream::from_raw_socket(TokioIo::new(client), Role::Server, Some(config))
                .await;
        let mut upstream =
            WebSocketStream::from_raw_socket(TokioIo::new(upstream), Role::Client, Some(config))
                .await;
        let end = relay(&mut client, &mut upstream, &mut turns, limits, &tasks).await;
        let (outcome, error) = close(end, &mut client, &mut upstream, &mut turns).await;
        turns.finish(outcome, error);
    }
}

/// Hands messages across until one side ends or llm-meter ends the WebSocket.
async fn relay(
    client: &mut Socket,
    upstream: &mut Socket,
    turns: &mut Turns,
    limits: Settings,
    tasks: &Tasks,
) -> End {
    let deadline = Instant::now() + limits.max_duration;
    let mut last = Instant::now();
    // Armed once and moved on only when it fires, so a busy WebSocket costs no timer work
    // per message.
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        let event = tokio::select! {
            message = client.next() => Event::Message(Side::Client, message),
            message = upstream.next() => Event::Message(Side::Upstream, message),
            () = &mut idle => Event::Idle,
            () = tokio::time::sleep_until(deadline) => Event::TooLong,
            () = tasks.closing() => Event::Shutdown,
        };
        let passed = match event {
            Event::Message(Side::Client, message) => {
                pass(Side::Client, message, upstream, turns, limits).await
            }
            Event::Message(Side::Upstream, message) => {
                pass(Side::Upstream, message, client, turns, limits).await
            }
            Event::Idle if last.elapsed() < limits.idle_timeout => {
                idle.as_mut().reset(last + limits.idle_timeout);
                continue;
            }
            Event::Idle => Err(ours(
                CloseCode::Away,
                "idle for longer than websocket_idle_timeout",
            )),
            Event::TooLong => Err(ours(
                CloseCode::Away,
                "open for longer than websocket_max_duration",
            )),
            Event::Shutdown => Err(ours(CloseCode::Away, "llm-meter is shutting down")),
        };
        match passed {
            Ok(()) => last = Instant::now(),
            Err(end) => return end,
        }
    }
}

/// llm-meter's own reason to close both sides (not the client's doing).
fn ours(code: CloseCode, reason: &str) -> End {
    End::Close(code, reason.to_owned(), Outcome::ClientGone)
}

/// One message from `from`, handed to `to` (and metered on the way), or why the relay ends.
async fn pass(
    from: Side,
    message: Option<Result<Message, WsError>>,
    to: &mut Socket,
    turns: &mut Turns,
    limits: Settings,
) -> Result<(), End> {
    let to_side = match from {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let message = match message {
        Some(Ok(Message::Close(frame))) => return Err(End::Closed(from, frame)),
        Some(Ok(message)) => message,
        Some(Err(WsError::Capacity(_))) => {
            let reason = match from {
                Side::Client => "a client message is larger than websocket_max_message_bytes",
                Side::Upstream => "an upstream message is larger than websocket_max_message_bytes",
            };
            return Err(End::Close(CloseCode::Size, reason.to_owned(), lost(from)));
        }
        Some(Err(err)) => return Err(End::Lost(from, err.to_string())),
        None => return Err(End::Lost(from, "connection closed".to_owned())),
    };
    let text = match &message {
        Message::Text(text) => Some(Bytes::from(text.clone())),
        _ => None,
    };
    // The client's request is admitted before it goes on; the upstream's answer is read after.
    if from == Side::Client
        && let Some(text) = &text
        && let Admission::Refuse(refused) = turns.on_client(text)
    {
        return Err(refusal(&refused));
    }
    send(to, message, limits)
        .await
        .map_err(|err| End::Lost(to_side, err))?;
    if from == Side::Upstream
        && let Some(text) = &text
        && let Admission::Refuse(refused) = turns.on_upstream(text)
    {
        return Err(refusal(&refused));
    }
    Ok(())
}

/// The outcome of responses cut because `side` went away.
fn lost(side: Side) -> Outcome {
    match side {
        Side::Client => Outcome::ClientGone,
        Side::Upstream => Outcome::UpstreamFailed,
    }
}

/// The close of a refused response: policy violation (1008), or try again later (1013) for a
/// rate limit, with the refusal's words as the reason.
fn refusal(refused: &Refused) -> End {
    let code = match refused {
        Refused::Guard(Refusal::RateLimited { .. }) => CloseCode::Again,
        Refused::Guard(_) | Refused::TooManyOpen => CloseCode::Policy,
    };
    End::Close(code, refused.to_string(), Outcome::ClientGone)
}

/// Sends one message, giving up when the side takes longer than the idle timeout to take it.
async fn send(to: &mut Socket, message: Message, limits: Settings) -> Result<(), String> {
    match tokio::time::timeout(limits.idle_timeout, to.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("stopped reading for longer than websocket_idle_timeout".to_owned()),
    }
}

/// Closes what is left open after `end`, waiting (up to `CLOSE_WAIT`) for each side's close
/// and reading the upstream's last messages for usage; returns how the open responses ended
/// and the error to log with the upgrade, if any.
async fn close(
    end: End,
    client: &mut Socket,
    upstream: &mut Socket,
    turns: &mut Turns,
) -> (Outcome, Option<String>) {
    match end {
        End::Closed(Side::Client, frame) => {
            let _ = tokio::time::timeout(CLOSE_WAIT, upstream.send(Message::Close(frame))).await;
            // The client's close is answered (tungstenite queued the reply) on this flush.
            tokio::join!(drain(upstream, Some(turns)), finish_close(client));
            (Outcome::ClientGone, None)
        }
        End::Closed(Side::Upstream, frame) => {
            let _ = tokio::time::timeout(CLOSE_WAIT, client.send(Message::Close(frame))).await;
            tokio::join!(drain(client, None), finish_close(upstream));
            (Outcome::UpstreamFailed, None)
        }
        End::Lost(Side::Client, reason) => {
            tracing::debug!(
                key_id = turns.key_id(),
                reason,
                "WebSocket client went away"
            );
            let frame = close_frame(CloseCode::Away, "the client went away");
            let _ = tokio::time::timeout(CLOSE_WAIT, upstream.send(Message::Close(frame))).await;
            drain(upstream, Some(turns)).await;
            // A client leaving is not an error, with or without a close handshake (the Codex
            // CLI drops its connection when its turn is done), as for a client leaving a stream.
            (Outcome::ClientGone, None)
        }
        End::Lost(Side::Upstream, reason) => {
            let frame = close_frame(CloseCode::Error, "the upstream connection was lost");
            let _ = tokio::time::timeout(CLOSE_WAIT, client.send(Message::Close(frame))).await;
            drain(client, None).await;
            (Outcome::UpstreamFailed, Some(format!("upstream: {reason}")))
        }
        End::Close(code, reason, outcome) => {
            tracing::info!(
                key_id = turns.key_id(),
                code = u16::from(code),
                reason,
                "closing a WebSocket"
            );
            let frame = close_frame(code, &reason);
            let _ = tokio::join!(
                tokio::time::timeout(CLOSE_WAIT, client.send(Message::Close(frame.clone()))),
                tokio::time::timeout(CLOSE_WAIT, upstream.send(Message::Close(frame))),
            );
            tokio::join!(drain(upstream, Some(turns)), drain(client, None));
            (outcome, Some(reason))
        }
    }
}

/// A close frame; its reason cut to what a frame may carry.
fn close_frame(code: CloseCode, reason: &str) -> Option<CloseFrame> {
    let reason = &reason[..crate::usage::floor_char_boundary(reason, MAX_REASON)];
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// Reads a closing side to its end (its close reply), up to `CLOSE_WAIT`; the upstream's text
/// still goes to the meter, for a response that completes as the WebSocket closes.
async fn drain(socket: &mut Socket, mut turns: Option<&mut Turns>) {
    let read = async {
        while let Some(Ok(message)) = socket.next().await {
            if let (Message::Text(text), Some(turns)) = (message, turns.as_deref_mut()) {
                let _ = turns.on_upstream(&Bytes::from(text));
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, read).await;
}

/// Completes a close the other side began: sends the queued close reply.
async fn finish_close(socket: &mut Socket) {
    let _ = tokio::time::timeout(CLOSE_WAIT, socket.close(None)).await;
}
