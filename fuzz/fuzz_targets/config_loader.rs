//! The config loader on arbitrary file text: errors are fine, panics are not.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use llm_meter::config::{Config, Flags};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Every login has a HOME; the keys a file may name by `key_env` are found in it too.
    let env: HashMap<String, String> = [
        ("HOME", "/home/fuzz"),
        ("KEY", "sk-fuzz-key"),
        ("UPSTREAM_KEY", "sk-upstream"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let _ = Config::from_layers(Some(&text), None, &env, &Flags::default());
});
