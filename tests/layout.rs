//! Guards the crate's module layout, reading the sources under `src/` (std only):
//! - no file is over 700 lines, but the test modules (files named `tests.rs` or `*_tests.rs`);
//! - the graph of the top-level modules (`driver/*` counts as `driver`, `machine/*` as
//!   `machine`), with an edge for every `crate::<module>` path outside a test module, has no
//!   cycle: imports only point down;
//! - nothing inside the crate names an item through a re-export of `lib.rs` (`crate::Error`,
//!   `use crate::{sys, Error}`): those are the public API, the crate uses the defining module.
//!
//! `RINGFLIP_LAYOUT_SRC=<dir>` checks another source tree (e.g. an older commit's `src/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

struct Source {
    /// Relative to `src/`, with `/` separators.
    path: String,
    text: String,
    /// `text` with comments removed and string and char literals blanked, line breaks kept.
    code: String,
}

impl Source {
    /// The top-level module this file belongs to (`driver/ring.rs` → `driver`), `None` for the
    /// crate root.
    fn module(&self) -> Option<&str> {
        let first = self.path.split('/').next().unwrap();
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (name != "lib" && name != "main").then_some(name)
    }

    fn is_test_module(&self) -> bool {
        // `tests.rs`, or `<topic>_tests.rs` beside the module it tests (`machine/`).
        let file = self.path.rsplit('/').next().unwrap_or(&self.path);
        file == "tests.rs" || file.ends_with("_tests.rs")
    }
}

fn src_dir() -> PathBuf {
    match std::env::var_os("RINGFLIP_LAYOUT_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    }
}

fn sources() -> Vec<Source> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Source>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap();
                let rel: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                out.push(Source {
                    path: rel.join("/"),
                    code: strip(&text),
                    text,
                });
            }
        }
    }
    let root = src_dir();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    assert!(
        out.iter().any(|s| s.path == "lib.rs"),
        "no lib.rs under {}",
        root.display()
    );
    out
}

/// Removes comments and blanks string and char literals (so `crate::` in a doc comment or a
/// message is not a path), keeping every line break so line numbers still match.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Keeps the line breaks of what is skipped.
    let skip = |out: &mut String, from: usize, to: usize| {
        for &ch in &c[from..to.min(c.len())] {
            if ch == '\n' {
                out.push('\n');
            }
        }
        out.push(' ');
    };
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let (start, mut depth) = (i, 0);
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            skip(&mut out, start, i);
        } else if c[i] == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#')))
            && !(i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // A raw string: r"…", r#"…"#, …
            let start = i;
            i += 1;
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            skip(&mut out, start, i);
        } else if c[i] == '"' {
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            skip(&mut out, start, i);
        } else if c[i] == '\''
            && (at(i + 2) == '\'' || (at(i + 1) == '\\' && c[i + 1..].contains(&'\'')))
        {
            // A char literal ('x', '\n', '\u{…}'); a lifetime has no closing quote.
            let start = i;
            i += 1;
            if c[i] == '\\' {
                i += 2;
            }
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            skip(&mut out, start, i);
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Every path under `crate::` in `code`: the first segment of each, with its line number. A
/// group (`crate::{a::B, c}`) gives each of its entries' first segments.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |from: usize| -> (String, usize) {
        let mut end = from;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        (code[from..end].to_string(), end)
    };
    let skip_ws = |mut k: usize| {
        while k < bytes.len() && bytes[k].is_ascii_whitespace() {
            k += 1;
        }
        k
    };
    let line_of = |k: usize| code[..k].matches('\n').count() + 1;
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let start = from + found;
        from = start + "crate::".len();
        // `crate` as a whole word (not `foo_crate::`, nor `$crate::` in a macro).
        if start > 0 {
            let before = bytes[start - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b'$' {
                continue;
            }
        }
        let k = skip_ws(from);
        if bytes.get(k) == Some(&b'{') {
            // Each entry of the group, at depth 1.
            let (mut k, mut depth, mut expect) = (k + 1, 1, true);
            while k < bytes.len() && depth > 0 {
                match bytes[k] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 1 => expect = true,
                    b if depth == 1 && expect && (b.is_ascii_alphabetic() || b == b'_') => {
                        let (name, end) = ident(k);
                        out.push((name, line_of(k)));
                        expect = false;
                        k = end;
                        continue;
                    }
                    _ => {}
                }
                k += 1;
            }
        } else {
            let (name, _) = ident(k);
            if !name.is_empty() {
                out.push((name, line_of(k)));
            }
        }
    }
    out
}

/// The names `lib.rs` re-exports (`pub use module::{A, B as C};` gives `A`, `C`).
fn reexports(lib: &Source) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for stmt in lib.code.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let list = match (path.find('{'), path.rfind('}')) {
            (Some(open), Some(close)) => path[open + 1..close].to_string(),
            _ => path.rsplit("::").next().unwrap().to_string(),
        };
        for entry in list.split(',') {
            let entry = entry.trim();
            let name = entry.rsplit(" as ").next().unwrap().trim();
            let name = name.rsplit("::").next().unwrap();
            if !name.is_empty() && name != "self" && name != "*" {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn no_file_is_over_700_lines() {
    let over: Vec<String> = sources()
        .iter()
        .filter(|s| !s.is_test_module())
        .map(|s| (s, s.text.lines().count()))
        .filter(|(_, n)| *n > MAX_LINES)
        .map(|(s, n)| format!("src/{} has {n} lines", s.path))
        .collect();
    assert!(
        over.is_empty(),
        "files over {MAX_LINES} lines (split them by concern):\n  {}",
        over.join("\n  ")
    );
}

#[test]
fn module_graph_has_no_cycle() {
    let sources = sources();
    let modules: BTreeSet<&str> = sources.iter().filter_map(Source::module).collect();
    // module -> module it names -> where (the first reference).
    let mut edges: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
    for s in sources.iter().filter(|s| !s.is_test_module()) {
        let Some(from) = s.module() else { continue };
        for (name, line) in crate_paths(&s.code) {
            if let Some(&to) = modules.get(name.as_str()) {
                if to != from {
                    edges
                        .entry(from)
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| format!("src/{}:{line}", s.path));
                }
            }
        }
    }

    // Depth-first search; a module met again while still on the stack closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    fn visit<'a>(
        m: &'a str,
        edges: &BTreeMap<&'a str, BTreeMap<&'a str, String>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        marks.insert(m, Mark::OnStack);
        stack.push(m);
        for &next in edges.get(m).into_iter().flat_map(|e| e.keys()) {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::OnStack => {
                    let at = stack.iter().position(|&s| s == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, edges, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(m, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for &m in &modules {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(cycle) = visit(m, &edges, &mut marks, &mut Vec::new()) {
                let steps: Vec<String> = cycle
                    .windows(2)
                    .map(|w| format!("{} -> {} ({})", w[0], w[1], edges[w[0]][w[1]]))
                    .collect();
                panic!(
                    "the module graph has a cycle: {}\n  {}",
                    cycle.join(" -> "),
                    steps.join("\n  ")
                );
            }
        }
    }
}

#[test]
fn nothing_is_imported_through_lib_reexports() {
    let sources = sources();
    let lib = sources.iter().find(|s| s.path == "lib.rs").unwrap();
    let reexported = reexports(lib);
    assert!(
        reexported.contains("Error"),
        "lib.rs's re-exports not found (read: {reexported:?})"
    );
    let mut found = Vec::new();
    for s in sources.iter().filter(|s| s.path != "lib.rs") {
        for (name, line) in crate_paths(&s.code) {
            if reexported.contains(&name) {
                found.push(format!("src/{}:{line}: crate::{name}", s.path));
            }
        }
    }
    assert!(
        found.is_empty(),
        "imports through lib.rs's public re-exports (name the defining module instead):\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_path_reader_sees_groups_and_skips_comments() {
    let code = strip(
        "use crate::{sys, error::Error};\n/// see crate::server\nlet x = \"crate::server\";\nfoo(crate::driver::Driver::new, '\"', 'a);\n",
    );
    assert_eq!(
        crate_paths(&code),
        vec![
            ("sys".to_string(), 1),
            ("error".to_string(), 1),
            ("driver".to_string(), 4)
        ]
    );
}
