//! The layers of `src/` point one way: a module imports only modules of its own layer or below
//! (see `lib.rs`'s crate doc), and no modules import one another in a cycle; and code stays cut
//! to size (STYLE.md §7). The tests read the source, so the rules keep themselves.

#![expect(
    clippy::unwrap_used,
    reason = "reading the source tree: a failure is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module of `src/` and its layer, from the bottom up.
const LAYERS: &[(&str, u8)] = &[
    // 1. leaves: the pieces every layer uses
    ("key", 1),
    ("attribution", 1),
    ("json", 1),
    ("error", 1),
    ("path", 1),
    ("deferred", 1),
    ("worker", 1),
    ("tasks", 1),
    ("client", 1),
    // 2. one normalized usage from every flavor
    ("usage", 2),
    // 3. amounts and prices of a usage
    ("money", 3),
    // 4. settings
    ("config", 4),
    ("logs", 4),
    // 5. the meter
    ("meter", 5),
    // 6. admission
    ("guard", 6),
    ("metrics", 6),
    ("otlp", 6),
    // 7. forwarding
    ("proxy", 7),
    ("cluster", 7),
    // 8. the state
    ("app", 8),
    // 9. our own endpoints
    ("api", 9),
    // 10. serving
    ("server", 10),
    // 11. the command line
    ("cli", 11),
    ("lib", 12),
    ("main", 12),
];

/// `src/` and every Rust file under it.
fn rust_files() -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    (src, files)
}

/// The top-level modules each file of `src/` names with a `crate::` path, per module.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (src, files) = rust_files();
    for path in files {
        let relative = path.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap();
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let entry = found.entry(module.clone()).or_default();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `llm_meter::crate::` never occurs; `$crate::` in macros is not ours.
                let before = &code[..at];
                if !name.is_empty() && !before.ends_with('$') && name != module {
                    entry.insert(name);
                }
            }
        }
    }
    found
}

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
        .unwrap_or_else(|| panic!("module `{module}` has no layer: add it to LAYERS and lib.rs"))
}

#[test]
fn no_module_imports_one_from_a_layer_above_it() {
    let mut upward = Vec::new();
    for (module, imported) in imports() {
        for name in imported {
            if layer(&name) > layer(&module) {
                upward.push(format!(
                    "{module} (layer {}) imports {name} (layer {})",
                    layer(&module),
                    layer(&name)
                ));
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn no_modules_import_one_another_in_a_cycle() {
    let graph = imports();
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if !done.insert(module.to_owned()) {
            return None;
        }
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(module, &graph, &mut path, &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn every_module_of_src_has_a_layer() {
    for module in imports().keys() {
        layer(module);
    }
}

/// Lines of a source file before its `#[cfg(test)] mod tests` (the code, without its tests).
fn code_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].starts_with("#[cfg(test)]") && w[1].starts_with("mod tests"))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// `line` without its string and char literals and its `//` comment, for counting braces.
fn braces_of(line: &str) -> (usize, usize) {
    let (mut open, mut close) = (0, 0);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => break,
            '"' => {
                while let Some(s) = chars.next() {
                    match s {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            // A char literal (`'{'`, `'\''`); a lifetime (`'a`) has no closing quote soon.
            '\'' => {
                let rest: String = chars.clone().take(4).collect();
                if let Some(end) = rest.find('\'').filter(|&end| end > 0) {
                    for _ in 0..=end {
                        chars.next();
                    }
                }
            }
            '{' => open += 1,
            '}' => close += 1,
            _ => {}
        }
    }
    (open, close)
}

#[test]
fn no_function_is_over_100_lines_and_no_file_over_700_without_its_tests() {
    let mut oversized = Vec::new();
    for path in rust_files().1 {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = code_lines(&text);
        if lines.len() > 700 {
            oversized.push(format!("{}: {} lines", path.display(), lines.len()));
        }
        let mut at = 0;
        while at < lines.len() {
            let line = lines[at].trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(super) fn ",
                "pub(crate) fn ",
                "const fn ",
                "pub const fn ",
            ]
            .iter()
            .any(|start| line.starts_with(start));
            if !is_fn {
                at += 1;
                continue;
            }
            let (mut depth, mut opened, mut end) = (0usize, false, at);
            for (i, l) in lines.iter().enumerate().skip(at) {
                let (open, close) = braces_of(l);
                opened |= open > 0;
                depth = (depth + open).saturating_sub(close);
                end = i;
                if (opened && depth == 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            let length = end - at + 1;
            if length > 100 {
                oversized.push(format!(
                    "{}:{} {} lines: {}",
                    path.display(),
                    at + 1,
                    length,
                    line
                ));
            }
            at = end + 1;
        }
    }
    assert!(oversized.is_empty(), "over size:\n{}", oversized.join("\n"));
}
