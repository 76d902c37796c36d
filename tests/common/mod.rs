//! Test harness: a scriptable mock upstream and the proxy, each on an ephemeral loopback port, in
//! process; the built binary as a child process; and the fixtures tests share.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

mod binary;
mod egress_proxy;
mod fixtures;
mod mock;
mod postgres;
mod proxy;
mod tls;

#[allow(
    unused_imports,
    reason = "each test file uses a different part of the harness"
)]
pub use self::{
    binary::{Binary, binary_command, peak_rss_kib, run_to_end},
    egress_proxy::{Asked, Behaviour, EgressProxy},
    fixtures::{
        chat_completion, chat_request, chat_stream, json_lines, key_id, ledger_row, totals_of,
        write_ledger,
    },
    mock::{Chunk, Mock, Received, Reply, openai_like},
    postgres::{OwnServer, TestDb, server_url, with_client},
    proxy::{Listening, Proxy, client, sse_data},
    tls::{H2_AND_HTTP1, HTTP1_ONLY, TestCa},
};
