//! Top-level fields of a JSON object, found by a scan instead of a parse: request inspection
//! and usage reading need a few fields of bodies that are mostly text they never look at.

/// The raw JSON of `keys` in the top level of a JSON object (`null` included as `null`), cut
/// out by a scan that follows strings (skipped with `memchr`) and nesting (closers must match
/// their openers) to find where each value ends. `None` when the scan cannot vouch for its
/// result (not an object, unbalanced, a key written with an escape, a wanted key twice,
/// trailing bytes): the caller then parses the whole body with serde, which decides. What the
/// scan skips is not validated: numbers and literals are taken as the bytes up to the next
/// delimiter.
pub fn top_level<'a, const N: usize>(
    body: &'a [u8],
    keys: [&[u8]; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut at = skip_space(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(body, at + 1);
    if body.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            let key_end = string_end(body, at)?;
            let key = body.get(at + 1..key_end - 1)?;
            if key.contains(&b'\\') {
                return None;
            }
            at = skip_space(body, key_end);
            if body.get(at) != Some(&b':') {
                return None;
            }
            let start = skip_space(body, at + 1);
            let end = value_end(body, start)?;
            if let Some(slot) = keys.iter().position(|k| *k == key) {
                if found[slot].is_some() {
                    return None;
                }
                found[slot] = Some(body.get(start..end)?);
            }
            at = skip_space(body, end);
            match body.get(at) {
                Some(b',') => at = skip_space(body, at + 1),
                Some(b'}') => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_space(body, at) == body.len()).then_some(found)
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Just past the string that starts (with its quote) at `at`.
fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
        if bytes.get(i) == Some(&b'"') {
            return Some(i + 1);
        }
        // An escape: the next byte is part of it, whatever it is.
        i += 2;
    }
}

/// Just past the value that starts at `at`.
fn value_end(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            // One bit per open level, 1 for an object.
            let (mut open, mut depth, mut i) = (0u64, 0u32, at);
            loop {
                match *bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    c @ (b'{' | b'[') => {
                        if depth == u64::BITS {
                            return None;
                        }
                        open = open << 1 | u64::from(c == b'{');
                        depth += 1;
                    }
                    c @ (b'}' | b']') => {
                        if depth == 0 || (open & 1 == 1) != (c == b'}') {
                            return None;
                        }
                        open >>= 1;
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let rest = bytes.get(at..)?;
            let len = rest
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(rest.len());
            (len > 0).then_some(at + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    /// Every value of the top level, as serde finds it (`null` kept as `null`).
    fn parsed(body: &str) -> std::collections::HashMap<String, &RawValue> {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn the_scan_cuts_out_what_serde_finds() {
        let long = "x\\\"y\\\\".repeat(1000);
        let bodies = [
            r#"{"id":"a","usage":{"n":1}}"#.to_owned(),
            r#" { "choices" : [ {"m":{"c":"say \"usage\": {}, ]} \\"}} , [1,2.5e3,-0] ], "usage" : null , "id" : "x\"y" } "#.to_owned(),
            r#"{"choices":[{"content":"{\"usage\":{\"n\":9}}"}],"usage":{"n":{"deep":[{"a":[]}]}},"x":true,"y":false,"z":null}"#.to_owned(),
            format!(r#"{{"messages":[{{"content":"{long}"}}],"id":"big","usage":{{"n":1}}}}"#),
            "{}".to_owned(),
            "{\n\t\"id\":\"é\",\r\n\"usage\":[]}".to_owned(),
        ];
        for body in &bodies {
            let scanned = top_level(body.as_bytes(), [b"id", b"usage"]).expect(body);
            let all = parsed(body);
            let expected = ["id", "usage"].map(|k| all.get(k).map(|v| v.get().as_bytes()));
            assert_eq!(scanned, expected, "{body}");
        }
    }

    #[test]
    fn strings_of_every_length_with_escapes_anywhere_end_where_serde_ends_them() {
        for len in 0..40_usize {
            for escape_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut text = "a".repeat(len);
                if let Some(at) = escape_at.filter(|at| *at < len) {
                    text.replace_range(at..=at, "\\\"");
                }
                let body = format!(r#"{{"id":"{text}","usage":[{{"k":"{text}"}}]}}"#);
                let scanned = top_level(body.as_bytes(), [b"id", b"usage"]).expect(&body);
                let all = parsed(&body);
                let expected = ["id", "usage"].map(|k| all.get(k).map(|v| v.get().as_bytes()));
                assert_eq!(scanned, expected, "{body}");
                let cut = &body[..body.find(r#"","usage"#).unwrap()];
                assert_eq!(top_level(cut.as_bytes(), [b"id"]), None, "{cut}");
            }
        }
    }

    #[test]
    fn what_the_scan_cannot_vouch_for_is_left_to_serde() {
        let bodies = [
            "",
            "[]",
            r#"["id"]"#,
            "<html>",
            r#"{"id":"a","usage":{"n":1}"#,
            r#"{"id":"a","usage":{"n":1}}}"#,
            r#"{"id":"a"} x"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"us\u0061ge":{"n":1}}"#,
            r#"{"choices":[{"a":1]},"usage":{}}"#,
            r#"{"id":"unterminated}"#,
            r#"{"id" "a"}"#,
            r#"{"id":"a",}"#,
            r#"{"id":"a\"}"#,
            r#"{"id":}"#,
        ];
        for body in bodies {
            assert_eq!(
                top_level(body.as_bytes(), [b"id", b"usage"]),
                None,
                "{body}"
            );
        }
    }
}
