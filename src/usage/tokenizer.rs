//! A compact BPE token counter, exact to OpenAI's tiktoken for `o200k_base` and `cl100k_base`.
//!
//! tiktoken's own structures (three maps of every token) take about 50 MB per encoding, and a
//! `HashMap` of token bytes to rank still 8; a meter that must stay small looks ranks up in an
//! open-addressing table of `u32`s over the token table embedded in the binary (written by
//! `build.rs`): under 3 MB of heap for `o200k_base`, built on first use. The algorithm is
//! tiktoken's: split the text with the encoding's pattern, then merge each piece's byte pairs
//! lowest rank first; only the number of resulting tokens is kept.
//!
//! The work one count may cause is bounded, since any client can make us count its text (a
//! response without usage, a stream left early). The merge is quadratic in a piece's length, so
//! a piece longer than `PIECE_CAP` bytes (a run of one letter has no spaces to split it) is merged
//! in slices of that length; and only the first `EXACT_CAP` bytes of a text are counted exactly,
//! the rest at the bytes-per-token rate of what was, as is anything left when the caller says
//! stop (a shutdown at the end of its grace period). Counts of texts within both caps are
//! tiktoken's exactly.

use std::hash::BuildHasher;

use fancy_regex::Regex;

use super::floor_char_boundary;

/// tiktoken's `o200k_base` pre-tokenization pattern.
const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// tiktoken's `cl100k_base` pre-tokenization pattern.
const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

static O200K_TOKENS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.tokens"));
static CL100K_TOKENS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.tokens"));

/// Why a counter cannot be built (a build of llm-meter whose embedded table is damaged).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The embedded token table ends inside a token.
    #[error("the token table is truncated")]
    Truncated,
    /// The embedded token table is over 4 GiB.
    #[error("the token table is too large")]
    TooLarge,
    /// The pre-tokenization pattern does not compile.
    #[error("the pre-tokenization pattern: {0}")]
    Pattern(#[from] Box<fancy_regex::Error>),
}

/// One of the encodings llm-meter counts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-5, o-series.
    O200kBase,
    /// GPT-3.5, GPT-4, OpenAI's embedding models.
    Cl100kBase,
}

/// Rank of a byte sequence that is not a token.
const NONE: u32 = u32::MAX;

/// Bytes of one text counted exactly; the rest is counted at the rate of these.
pub const EXACT_CAP: usize = 128 * 1024;
/// Longest slice of a piece merged at once: the merge is quadratic in it.
pub const PIECE_CAP: usize = 64;
/// Bytes per token assumed when nothing was counted exactly to take a rate from.
pub const BYTES_PER_TOKEN: u64 = 4;

/// Token bytes to rank: every token is a slice of the embedded table, found through `slots`.
struct Ranks {
    table: &'static [u8],
    /// Where each rank's bytes start in `table` (its length byte is just before).
    starts: Vec<u32>,
    /// Linear-probing hash table of `rank + 1`; 0 is an empty slot. At most half full.
    slots: Vec<u32>,
    hasher: foldhash::fast::FixedState,
}

impl Ranks {
    fn new(table: &'static [u8]) -> Result<Self, TableError> {
        let mut starts = Vec::with_capacity(table.len() / 7);
        let mut at = 0;
        while let Some(&len) = table.get(at) {
            let start = at + 1;
            at = start + usize::from(len);
            if at > table.len() {
                return Err(TableError::Truncated);
            }
            starts.push(u32::try_from(start).map_err(|_| TableError::TooLarge)?);
        }
        let mut ranks = Self {
            table,
            slots: vec![0; (starts.len() * 2).next_power_of_two()],
            starts,
            hasher: foldhash::fast::FixedState::default(),
        };
        for rank in 0..ranks.starts.len() {
            let token = ranks.token(rank);
            let mut slot = ranks.slot_of(token);
            while ranks.slots[slot] != 0 {
                slot = (slot + 1) & (ranks.slots.len() - 1);
            }
            // Ranks fit in u32: `starts` did.
            ranks.slots[slot] = u32::try_from(rank + 1).unwrap_or(u32::MAX);
        }
        Ok(ranks)
    }

    fn token(&self, rank: usize) -> &'static [u8] {
        let start = self.starts[rank] as usize;
        let len = usize::from(self.table[start - 1]);
        &self.table[start..start + len]
    }

    fn slot_of(&self, bytes: &[u8]) -> usize {
        (self.hasher.hash_one(bytes) as usize) & (self.slots.len() - 1)
    }

    fn get(&self, bytes: &[u8]) -> u32 {
        let mut slot = self.slot_of(bytes);
        loop {
            match self.slots[slot] {
                0 => return NONE,
                entry if self.token(entry as usize - 1) == bytes => return entry - 1,
                _ => slot = (slot + 1) & (self.slots.len() - 1),
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.starts.len()
    }
}

/// Counts tokens of one encoding.
pub struct Bpe {
    ranks: Ranks,
    pattern: Regex,
}

impl Bpe {
    /// Builds the counter of `encoding` from its embedded table (tens of milliseconds).
    pub fn new(encoding: Encoding) -> Result<Self, TableError> {
        let (table, pattern) = match encoding {
            Encoding::O200kBase => (O200K_TOKENS, O200K_PATTERN),
            Encoding::Cl100kBase => (CL100K_TOKENS, CL100K_PATTERN),
        };
        let pattern = Regex::new(pattern).map_err(Box::new)?;
        Ok(Self {
            ranks: Ranks::new(table)?,
            pattern,
        })
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes)
    }

    /// The number of tokens of `text`: tiktoken's `encode_ordinary(text).len()` within the
    /// caps (see the module doc), an approximation past them.
    pub fn count(&self, text: &str) -> u64 {
        self.count_until(text, 0, &|| false)
    }

    /// The tokens of `text` followed by `more_bytes` bytes not given (counted at the rate of
    /// `text`), counting exactly until `stop` says so or `EXACT_CAP` bytes are counted.
    pub fn count_until(&self, text: &str, more_bytes: u64, stop: &dyn Fn() -> bool) -> u64 {
        let head = &text[..floor_char_boundary(text, EXACT_CAP)];
        let mut tokens = 0;
        let mut counted = 0;
        for piece in self.pattern.find_iter(head) {
            if stop() {
                break;
            }
            // A piece the pattern engine gave up on (its backtracking limit) is not counted.
            let Ok(piece) = piece else { continue };
            counted = piece.end();
            tokens += self.piece_len(piece.as_str());
        }
        let rest = (text.len() - counted) as u64 + more_bytes;
        tokens + at_rate(rest, tokens, counted as u64)
    }

    /// Tokens of one piece of the pattern, merged in slices of at most `PIECE_CAP` bytes.
    fn piece_len(&self, mut piece: &str) -> u64 {
        let mut tokens = 0;
        while !piece.is_empty() {
            let mut end = floor_char_boundary(piece, PIECE_CAP);
            if end == 0 {
                end = piece.len();
            }
            let slice = &piece.as_bytes()[..end];
            tokens += if self.rank(slice) == NONE {
                self.merged_len(slice)
            } else {
                1
            };
            piece = &piece[end..];
        }
        tokens
    }

    /// Tokens of a piece that is not itself a token: tiktoken's byte-pair merge, lowest rank
    /// first, counting the parts left.
    fn merged_len(&self, piece: &[u8]) -> u64 {
        if piece.len() < 2 {
            return piece.len() as u64;
        }
        // (start of part, rank of the part merged with the next one)
        let mut parts: Vec<(usize, u32)> = (0..piece.len() - 1)
            .map(|i| (i, self.rank(&piece[i..i + 2])))
            .collect();
        parts.push((piece.len() - 1, NONE));
        parts.push((piece.len(), NONE));
        let rank_at = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0])
            } else {
                NONE
            }
        };
        loop {
            let (i, lowest) = parts[..parts.len() - 1].iter().enumerate().fold(
                (0, NONE),
                |best, (i, &(_, rank))| {
                    if rank < best.1 { (i, rank) } else { best }
                },
            );
            if lowest == NONE {
                break;
            }
            if i > 0 {
                parts[i - 1].1 = rank_at(&parts, i - 1);
            }
            parts[i].1 = rank_at(&parts, i);
            parts.remove(i + 1);
        }
        (parts.len() - 1) as u64
    }
}

/// Tokens in `bytes` more bytes, at the rate `tokens` per `counted` bytes (rounded up).
fn at_rate(bytes: u64, tokens: u64, counted: u64) -> u64 {
    if bytes == 0 {
        return 0;
    }
    if tokens == 0 || counted == 0 {
        return bytes.div_ceil(BYTES_PER_TOKEN);
    }
    let estimate = u128::from(bytes) * u128::from(tokens);
    u64::try_from(estimate.div_ceil(u128::from(counted))).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts that exercise the patterns: contractions, digits, punctuation runs, whitespace at
    /// line ends, CJK, accents, emoji, code, and long unbroken runs that need many merges.
    fn corpus() -> Vec<String> {
        let mut texts: Vec<String> = [
            "hello world",
            "Hello, world!",
            "tiktoken is great!",
            "I'm sure they'll say it's what we'd've done",
            "12345678901 3.14159 2026-11-25T09:00:00Z",
            "fn main() {\n    println!(\"{}\", x?);\n}\n\n\n   \t  trailing   ",
            "日本語のテキストとEnglish mixed 😀🚀 emoji",
            "Ça coûte 12,50 € — naïve façade",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "https://example.com/path/to/resource?query=value&other=1#frag",
            "    indented\r\n\r\nwindows lines\r\n",
            "ALLCAPS WORDS AND MiXeD CaSe ÉTÉ",
            "",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        texts.push(
            "The quick brown fox jumps over the lazy dog. ".repeat(50) + "supercalifragilistic",
        );
        // Real documents: prose, tables, shell, TOML and Rust, line by line and whole.
        for document in [include_str!("../../README.md"), include_str!("estimate.rs")] {
            texts.extend(document.lines().map(str::to_owned));
            texts.push(document.to_owned());
        }
        texts
    }

    #[test]
    fn counts_equal_tiktoken_for_both_encodings() {
        for (encoding, reference) in [
            (Encoding::O200kBase, tiktoken_rs::o200k_base().unwrap()),
            (Encoding::Cl100kBase, tiktoken_rs::cl100k_base().unwrap()),
        ] {
            let ours = Bpe::new(encoding).unwrap();
            for text in corpus() {
                assert_eq!(
                    ours.count(&text),
                    reference.encode_ordinary(&text).len() as u64,
                    "{encoding:?}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_run_of_one_letter_is_counted_in_bounded_time_and_close_to_tiktoken() {
        let ours = Bpe::new(Encoding::O200kBase).unwrap();
        let reference = tiktoken_rs::o200k_base().unwrap();
        let text = "a".repeat(8 * 1024);
        let exact = reference.encode_ordinary(&text).len() as u64;
        let counted = ours.count(&text);
        // Slices of PIECE_CAP bytes each end a token early at most.
        let slack = (text.len() / PIECE_CAP) as u64 + 1;
        assert!(counted.abs_diff(exact) <= slack, "{counted} vs {exact}");
        let started = std::time::Instant::now();
        let huge = "a".repeat(4 * 1024 * 1024);
        let counted = ours.count(&huge);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let per_token = huge.len() as u64 / counted;
        assert!((2..=64).contains(&per_token), "{per_token} bytes per token");
    }

    #[test]
    fn text_past_the_exact_cap_is_counted_at_the_rate_of_what_was() {
        let ours = Bpe::new(Encoding::O200kBase).unwrap();
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let per_sentence = ours.count(sentence);
        let text = sentence.repeat(4 * EXACT_CAP / sentence.len());
        let counted = ours.count(&text);
        let reference = tiktoken_rs::o200k_base().unwrap();
        let exact = reference.encode_ordinary(&text).len() as u64;
        assert!(
            counted.abs_diff(exact) * 100 <= exact,
            "{counted} vs {exact}"
        );
        // Bytes not given are counted at the same rate.
        let with_more = ours.count_until(sentence, sentence.len() as u64, &|| false);
        assert_eq!(with_more, 2 * per_sentence);
    }

    #[test]
    fn a_count_told_to_stop_approximates_the_rest_by_bytes() {
        let ours = Bpe::new(Encoding::O200kBase).unwrap();
        let text = "hello world ".repeat(1_000);
        assert_eq!(ours.count_until(&text, 0, &|| true), text.len() as u64 / 4);
        assert_eq!(ours.count_until("", 0, &|| true), 0);
    }

    #[test]
    fn every_token_of_the_table_is_one_token() {
        let ours = Bpe::new(Encoding::O200kBase).unwrap();
        assert_eq!(ours.ranks.len(), 199_998);
        for rank in [0, 1, 255, 256, 100_000, 199_997] {
            let token = ours.ranks.token(rank);
            assert_eq!(ours.rank(token) as usize, rank, "{token:?}");
        }
        assert_eq!(ours.rank(b"not a token at all, surely"), NONE);
        assert_eq!(ours.rank(b"hello"), 24_912);
        assert_eq!(ours.rank(b" world"), 2_375);
    }
}
