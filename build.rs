//! Writes the token tables of the two BPE encodings llm-meter estimates with (`o200k_base`,
//! `cl100k_base`) in a compact form, read by `usage::tokenizer`: for each rank in order, one
//! length byte and the token's bytes. The tables come from tiktoken-rs, which carries OpenAI's
//! published files; at run time only these ~3 MB are embedded and indexed, instead of the
//! ~50 MB a full tiktoken `CoreBPE` takes.

use std::error::Error;
use std::path::Path;

/// Regular (non-special) tokens in each encoding: ranks 0 to N-1.
const ENCODINGS: [(&str, u32); 2] = [("o200k_base", 199_998), ("cl100k_base", 100_256)];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    let out = std::env::var("OUT_DIR")?;
    for (name, tokens) in ENCODINGS {
        let bpe = match name {
            "o200k_base" => tiktoken_rs::o200k_base(),
            _ => tiktoken_rs::cl100k_base(),
        }
        .map_err(|e| e.to_string())?;
        write(
            &Path::new(&out).join(format!("{name}.tokens")),
            &bpe,
            tokens,
        )?;
    }
    Ok(())
}

fn write(path: &Path, bpe: &tiktoken_rs::CoreBPE, tokens: u32) -> Result<(), Box<dyn Error>> {
    let mut table = Vec::with_capacity(tokens as usize * 8);
    for rank in 0..tokens {
        let bytes = bpe
            .decode_bytes(&[rank])
            .map_err(|e| format!("rank {rank}: {e:?}"))?;
        let len = u8::try_from(bytes.len()).map_err(|_| format!("rank {rank} is too long"))?;
        if len == 0 {
            return Err(format!("rank {rank} is empty").into());
        }
        table.push(len);
        table.extend_from_slice(&bytes);
    }
    std::fs::write(path, table)?;
    Ok(())
}
