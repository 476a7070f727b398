//! Architecture rules checked on the source text, std only and in well under
//! a second:
//!
//! - **No cycles between sibling modules** of a crate. Module `a` depends on
//!   its sibling `b` when any file under `a` names a path into `b`
//!   (`use crate::b::...`, `crate::b::f()`, `super::b::X`, with `{...}`
//!   groups expanded); each path resolves to the longest prefix that is a
//!   module file. Comments count (an intra-doc link is a dependency too);
//!   `#[cfg(test)] mod ... { ... }` blocks and `tests.rs` files do not.
//! - **`pb::` stays at the edge**: only the modules that convert wire
//!   messages or speak the protocol name the generated types.
//!
//! This is the Rust form of the import-graph check of issue 15, so that
//! `cargo test` keeps the layering true.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A module path inside a crate, `[]` for the crate root.
type ModulePath = Vec<String>;

/// One source file of a crate.
struct SourceFile {
    /// Path relative to the crate's `src/`, with `/` separators.
    rel: String,
    module: ModulePath,
    /// The text with `#[cfg(test)]` module blocks blanked out (lines kept).
    text: String,
}

/// Where a dependency comes from: file (relative to the workspace) and line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Evidence {
    file: String,
    line: usize,
}

/// Sibling module edges `a -> b`, each with the first place that causes it.
type Edges = BTreeMap<ModulePath, BTreeMap<ModulePath, Evidence>>;

fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is tests/; the workspace is its parent.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", here.display()))
        .to_path_buf()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Module path of a file from its path under `src/`: `a/b.rs` and
/// `a/b/mod.rs` are `a::b`; `lib.rs` and `main.rs` are the root.
fn module_of(rel: &str) -> ModulePath {
    let stem = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if parts
        .last()
        .is_some_and(|last| last == "mod" || last == "lib" || last == "main")
    {
        parts.pop();
    }
    parts
}

/// The crate's source files, test-only files left out.
fn sources(crate_dir: &str) -> Vec<SourceFile> {
    let src = workspace_root().join(crate_dir).join("src");
    let mut paths = Vec::new();
    collect_rs(&src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let rel = path
                .strip_prefix(&src)
                .unwrap_or_else(|e| panic!("{} outside {}: {e}", path.display(), src.display()))
                .to_string_lossy()
                .replace('\\', "/");
            let module = module_of(&rel);
            // `#[cfg(test)] mod tests;` files are test code.
            if module.last().is_some_and(|last| last == "tests") {
                return None;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            Some(SourceFile {
                rel,
                module,
                text: blank_test_modules(&text),
            })
        })
        .collect()
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Length in bytes of the UTF-8 character that starts with `lead`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Whether a raw string (`r"`, `r#"`, `br#"`...) starts at `i`; then the
/// number of `#`s and the index of its opening quote.
fn raw_string_at(text: &[u8], i: usize) -> Option<(usize, usize)> {
    let starts_word = |at: usize| at == 0 || !is_ident_char(text[at - 1]);
    let prefix_ok =
        text[i] == b'r' && (starts_word(i) || (i > 0 && text[i - 1] == b'b' && starts_word(i - 1)));
    if !prefix_ok {
        return None;
    }
    let mut j = i + 1;
    while text.get(j) == Some(&b'#') {
        j += 1;
    }
    (text.get(j) == Some(&b'"')).then_some((j - i - 1, j))
}

/// Index just past the `}` that closes the `{` at `open`, skipping strings,
/// raw strings, character literals and comments; the text's end when the
/// brace is never closed.
fn matching_brace(text: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < text.len() {
        if text[i..].starts_with(b"//") {
            while i < text.len() && text[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if text[i..].starts_with(b"/*") {
            let mut nesting = 0usize;
            while i < text.len() {
                if text[i..].starts_with(b"/*") {
                    nesting += 1;
                    i += 2;
                } else if text[i..].starts_with(b"*/") {
                    nesting -= 1;
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if let Some((hashes, quote)) = raw_string_at(text, i) {
            let mut k = quote + 1;
            while k < text.len() {
                let closes = text[k] == b'"'
                    && text.len() >= k + 1 + hashes
                    && text[k + 1..k + 1 + hashes].iter().all(|&h| h == b'#');
                if closes {
                    break;
                }
                k += 1;
            }
            i = k + 1 + hashes;
            continue;
        }
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{7b}', 'é'), or else a
                // lifetime or label, which needs nothing skipped.
                if text.get(i + 1) == Some(&b'\\') {
                    i += 2;
                    while i < text.len() && text[i] != b'\'' {
                        i += 1;
                    }
                } else if let Some(&lead) = text.get(i + 1) {
                    let width = utf8_len(lead);
                    if text.get(i + 1 + width) == Some(&b'\'') {
                        i += 1 + width;
                    }
                }
            }
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    text.len()
}

/// `text` with every `#[cfg(test)] mod name { ... }` block replaced by
/// spaces, newlines kept so that line numbers stay right.
fn blank_test_modules(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    let marker = b"#[cfg(test)]";
    let mut from = 0;
    while let Some(at) = find(&bytes, marker, from) {
        let mut i = at + marker.len();
        // Further attributes, then `mod name {` (possibly `pub mod`).
        loop {
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if bytes[i..].starts_with(b"#[") {
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
                i = (i + 1).min(bytes.len());
            } else {
                break;
            }
        }
        let rest = &bytes[i..];
        let after_vis = if rest.starts_with(b"pub ") { i + 4 } else { i };
        if !bytes[after_vis..].starts_with(b"mod ") {
            from = at + marker.len();
            continue;
        }
        let mut j = after_vis + 4;
        while j < bytes.len() && (is_ident_char(bytes[j]) || bytes[j].is_ascii_whitespace()) {
            j += 1;
        }
        if bytes.get(j) != Some(&b'{') {
            from = j;
            continue;
        }
        let end = matching_brace(&bytes, j);
        for b in &mut bytes[at..end] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        from = end;
    }
    // Every byte of a block but its newlines became a space, so whole
    // characters were replaced and the text is still UTF-8.
    String::from_utf8_lossy(&bytes).into_owned()
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Every module path `text` names through `crate::` or `super::`, as
/// absolute paths from the crate root (before resolving to a module file),
/// with the byte offset where each one is written.
fn paths_in(text: &str, me: &[String]) -> Vec<(ModulePath, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || !is_ident_char(bytes[i - 1]);
        let is_crate = bytes[i..].starts_with(b"crate::");
        let is_super = bytes[i..].starts_with(b"super::");
        if !at_word || !(is_crate || is_super) {
            i += 1;
            continue;
        }
        let start = i;
        let base: ModulePath = if is_crate {
            i += "crate::".len();
            Vec::new()
        } else {
            let mut ups = 0;
            while bytes[i..].starts_with(b"super::") {
                ups += 1;
                i += "super::".len();
            }
            me[..me.len().saturating_sub(ups)].to_vec()
        };
        for (tail, offset) in expand(text, i) {
            let mut path = base.clone();
            path.extend(tail);
            out.push((path, offset.max(start)));
        }
    }
    out
}

/// The paths written at `text[i..]`: `a::b::c`, a group `{a, b::{c, d}}`,
/// with `self` standing for the group's prefix and `*` or a non-path for
/// the prefix itself. Each path comes with the offset of its last segment.
fn expand(text: &str, i: usize) -> Vec<(ModulePath, usize)> {
    let bytes = text.as_bytes();
    let mut i = i;
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    if bytes.get(i) == Some(&b'{') {
        // The closing brace, or the end of an unclosed group.
        let close = group_close(bytes, i).unwrap_or(bytes.len());
        let mut out = Vec::new();
        let mut depth = 0;
        let mut item_start = i + 1;
        for (j, &b) in bytes.iter().enumerate().take(close).skip(i) {
            match b {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                b',' if depth == 1 => {
                    out.extend(expand_item(text, item_start, j));
                    item_start = j + 1;
                }
                _ => {}
            }
        }
        out.extend(expand_item(text, item_start, close));
        return out;
    }
    let name_end = (i..bytes.len())
        .find(|&j| !is_ident_char(bytes[j]))
        .unwrap_or(bytes.len());
    if name_end == i {
        return vec![(Vec::new(), i)];
    }
    let name = &text[i..name_end];
    if name == "self" {
        return vec![(Vec::new(), i)];
    }
    if bytes[name_end..].starts_with(b"::") {
        expand(text, name_end + 2)
            .into_iter()
            .map(|(mut tail, offset)| {
                tail.insert(0, name.to_string());
                (tail, offset)
            })
            .collect()
    } else {
        vec![(vec![name.to_string()], i)]
    }
}

/// One item of a group, `text[start..end]`; nothing for an empty item.
fn expand_item(text: &str, start: usize, end: usize) -> Vec<(ModulePath, usize)> {
    if text[start..end].trim().is_empty() {
        return Vec::new();
    }
    // Parse the item on its own, so that the path cannot run past its comma.
    let item = &text[..end];
    expand(item, start)
}

/// Index of the `}` closing the group opened at `open` (groups hold only
/// paths, so plain brace counting is enough); `None` when unclosed.
fn group_close(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (j, &b) in bytes.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
    }
    None
}

/// The longest prefix of `path` that is a module of the crate, if any
/// (the root does not count: everything is under it).
fn resolve<'m>(modules: &'m BTreeSet<ModulePath>, path: &[String]) -> Option<&'m ModulePath> {
    (1..=path.len()).rev().find_map(|k| modules.get(&path[..k]))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The sibling-module graph of the crate in `crate_dir`.
fn module_graph(crate_dir: &str) -> Edges {
    let files = sources(crate_dir);
    let modules: BTreeSet<ModulePath> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges = Edges::new();
    for file in &files {
        let me = &file.module;
        for (path, offset) in paths_in(&file.text, me) {
            let Some(target) = resolve(&modules, &path) else {
                continue;
            };
            let common = me.iter().zip(target).take_while(|(a, b)| a == b).count();
            if common == me.len() || common == target.len() {
                // Itself, an ancestor or a descendant: not a sibling.
                continue;
            }
            let from = me[..=common].to_vec();
            let to = target[..=common].to_vec();
            let evidence = Evidence {
                file: format!("{crate_dir}/src/{}", file.rel),
                line: line_of(&file.text, offset),
            };
            let place = edges
                .entry(from)
                .or_default()
                .entry(to)
                .or_insert(evidence.clone());
            if evidence < *place {
                *place = evidence;
            }
        }
    }
    edges
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(edges: &Edges) -> Vec<BTreeSet<ModulePath>> {
    struct Tarjan<'e> {
        edges: &'e Edges,
        index: BTreeMap<&'e ModulePath, usize>,
        low: BTreeMap<&'e ModulePath, usize>,
        stack: Vec<&'e ModulePath>,
        on_stack: BTreeSet<&'e ModulePath>,
        found: Vec<BTreeSet<ModulePath>>,
    }
    impl<'e> Tarjan<'e> {
        fn visit(&mut self, v: &'e ModulePath) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flat_map(BTreeMap::keys) {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.insert(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !tarjan.index.contains_key(v) {
            tarjan.visit(v);
        }
    }
    tarjan.found
}

fn module_name(path: &[String]) -> String {
    path.join("/")
}

/// Each cycle with its edges and one file:line per edge; empty when none.
fn cycle_report(edges: &Edges) -> String {
    let mut report = String::new();
    for component in cycles(edges) {
        let names: Vec<String> = component.iter().map(|m| module_name(m)).collect();
        let _ = writeln!(report, "cycle: {}", names.join(", "));
        for from in &component {
            for (to, evidence) in edges.get(from).into_iter().flatten() {
                if component.contains(to) {
                    let _ = writeln!(
                        report,
                        "    {} -> {}  ({}:{})",
                        module_name(from),
                        module_name(to),
                        evidence.file,
                        evidence.line
                    );
                }
            }
        }
    }
    report
}

fn assert_no_cycles(crate_dir: &str) {
    let report = cycle_report(&module_graph(crate_dir));
    assert!(
        report.is_empty(),
        "module cycles between siblings in {crate_dir}:\n{report}"
    );
}

/// Lines naming `pb::` outside `allowed` (file paths under `src/`; an entry
/// ending in `/` allows a whole directory).
fn pb_outside(crate_dir: &str, allowed: &[&str]) -> Vec<String> {
    let permitted = |rel: &str| {
        allowed
            .iter()
            .any(|entry| rel == *entry || (entry.ends_with('/') && rel.starts_with(entry)))
    };
    let mut found = Vec::new();
    for file in sources(crate_dir) {
        if permitted(&file.rel) {
            continue;
        }
        for (n, line) in file.text.lines().enumerate() {
            if names_pb(line) {
                found.push(format!(
                    "{crate_dir}/src/{}:{}: {}",
                    file.rel,
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    found
}

/// Whether `line` names the generated protocol module (`pb::`, not `xpb::`).
fn names_pb(line: &str) -> bool {
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(at) = find(bytes, b"pb::", from) {
        if at == 0 || !is_ident_char(bytes[at - 1]) {
            return true;
        }
        from = at + 1;
    }
    false
}

fn assert_pb_stays_at_the_edge(crate_dir: &str, allowed: &[&str]) {
    let found = pb_outside(crate_dir, allowed);
    assert!(
        found.is_empty(),
        "{} lines of {crate_dir} name pb:: outside the edge modules ({}); convert at the edge \
         instead:\n{}",
        found.len(),
        allowed.join(", "),
        found.join("\n")
    );
}

// The cli, tests, benches and fuzz crates may use `pb` anywhere: the CLI
// and the harness are clients of the protocol, not domain code.

mod common {
    /// The generated code itself (`lib.rs`) and the wire-level modules:
    /// conversions from wire messages and the framing codec.
    const PB_ALLOWED: &[&str] = &["lib.rs", "convert.rs", "codec.rs"];

    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("common");
    }

    #[test]
    fn pb_stays_at_the_edge() {
        super::assert_pb_stays_at_the_edge("common", PB_ALLOWED);
    }
}

mod control_plane {
    /// The gRPC services and the server that wires them, and the HTTP API,
    /// whose handlers make the services' gRPC calls in process.
    const PB_ALLOWED: &[&str] = &["service/", "server.rs", "lib.rs", "http_api/"];

    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("control-plane");
    }

    #[test]
    fn pb_stays_at_the_edge() {
        super::assert_pb_stays_at_the_edge("control-plane", PB_ALLOWED);
    }
}

mod node_agent {
    /// The agent's protocol client, and `main.rs`.
    const PB_ALLOWED: &[&str] = &["control_plane.rs", "control_plane/", "main.rs"];

    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("node-agent");
    }

    #[test]
    fn pb_stays_at_the_edge() {
        super::assert_pb_stays_at_the_edge("node-agent", PB_ALLOWED);
    }
}

/// The etcd client is a wire-edge crate as a whole: its generated `pb`
/// types never leave it (its public API has none), so only cycles are
/// checked.
mod etcd {
    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("etcd");
    }
}

mod cli {
    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("cli");
    }
}

mod harness {
    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("tests");
    }
}

mod benches {
    #[test]
    fn no_module_cycles() {
        super::assert_no_cycles("benches");
    }
}

/// Tests of the checker itself, on small strings.
mod checker {
    use super::*;

    fn m(path: &str) -> ModulePath {
        if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').map(str::to_string).collect()
        }
    }

    /// The paths `text` names from module `me`, as `a/b/c` strings.
    fn check(text: &str, me: &str, expected: &[&str]) {
        let got: BTreeSet<String> = paths_in(text, &m(me))
            .into_iter()
            .map(|(p, _)| module_name(&p))
            .collect();
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, expected, "paths in {text:?} from {me:?}");
    }

    #[test]
    fn plain_paths() {
        check("use crate::a::b::C;", "x", &["a/b/C"]);
        check("let v = crate::a::f(1);", "x", &["a/f"]);
        check("crate::a", "x", &["a"]);
        check(
            "fn f() -> crate::a::B<crate::c::D> {}",
            "x",
            &["a/B", "c/D"],
        );
        check("use crate::a::B as C;", "x", &["a/B"]);
        check("use crate::a::*;", "x", &["a"]);
        check("$crate::a::f!()", "x", &["a/f"]);
    }

    #[test]
    fn only_whole_words() {
        check("use mycrate::a; let x = not_super::b;", "x", &[]);
        check("pub(super) fn f() {} pub(crate) struct S;", "x/y", &[]);
    }

    #[test]
    fn groups() {
        check("use crate::{a, b::C};", "x", &["a", "b/C"]);
        check("use crate::a::{self, B};", "x", &["a", "a/B"]);
        check(
            "use crate::a::{\n    B,\n    C as D,\n};",
            "x",
            &["a/B", "a/C"],
        );
        check("use crate::{}; use crate::a::{,};", "x", &[]);
    }

    #[test]
    fn nested_groups() {
        check(
            "use crate::{a::{b, c::{d, e}}, f::{self}};",
            "x",
            &["a/b", "a/c/d", "a/c/e", "f"],
        );
    }

    #[test]
    fn super_paths() {
        check("use super::b::C;", "p/a", &["p/b/C"]);
        check("use super::super::q::R;", "p/a/z", &["p/q/R"]);
        check("use super::{b, c};", "p/a", &["p/b", "p/c"]);
        check("use super::super::super::top;", "a", &["top"]);
    }

    #[test]
    fn lines_of_each_path() {
        let text = "use crate::{\n    a,\n    b::C,\n};\nfn f() { crate::d::g() }\n";
        let lines: BTreeMap<String, usize> = paths_in(text, &m("x"))
            .into_iter()
            .map(|(p, offset)| (module_name(&p), line_of(text, offset)))
            .collect();
        assert_eq!(lines["a"], 2);
        assert_eq!(lines["b/C"], 3);
        assert_eq!(lines["d/g"], 5);
    }

    #[test]
    fn module_paths_of_files() {
        assert_eq!(module_of("lib.rs"), m(""));
        assert_eq!(module_of("main.rs"), m(""));
        assert_eq!(module_of("a.rs"), m("a"));
        assert_eq!(module_of("a/mod.rs"), m("a"));
        assert_eq!(module_of("a/b.rs"), m("a/b"));
    }

    #[test]
    fn test_modules_are_blanked_with_lines_kept() {
        let text = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n    \
                    const S: &str = \"}\";\n    const R: &str = r#\"}\"#;\n    \
                    const C: char = '}';\n    fn f<'a>(x: &'a str) {} // }\n    /* } */\n}\n\
                    use crate::c;\n";
        let blanked = blank_test_modules(text);
        assert_eq!(blanked.lines().count(), text.lines().count());
        check(&blanked, "x", &["a", "c"]);
        assert_eq!(
            line_of(&blanked, blanked.find("crate::c").expect("kept")),
            11
        );
        // Other cfg(test) items and file modules are left alone.
        let kept = "#[cfg(test)]\nuse crate::a;\n#[cfg(test)]\nmod tests;\n";
        assert_eq!(blank_test_modules(kept), kept);
        let with_attrs = "#[cfg(test)]\n#[allow(dead_code)]\npub mod tests { use crate::a; }\n";
        check(&blank_test_modules(with_attrs), "x", &[]);
    }

    #[test]
    fn resolves_to_the_longest_module() {
        let modules: BTreeSet<ModulePath> = [m("a"), m("a/b"), m("c")].into_iter().collect();
        assert_eq!(resolve(&modules, &m("a/b/C")), Some(&m("a/b")));
        assert_eq!(resolve(&modules, &m("a/X")), Some(&m("a")));
        assert_eq!(resolve(&modules, &m("VERSION")), None);
    }

    #[test]
    fn cycles_are_reported_with_their_edges() {
        let place = |line| Evidence {
            file: "k/src/a.rs".to_string(),
            line,
        };
        let mut edges = Edges::new();
        edges.entry(m("a")).or_default().insert(m("b"), place(1));
        edges.entry(m("b")).or_default().insert(m("a"), place(2));
        edges.entry(m("b")).or_default().insert(m("c"), place(3));
        let report = cycle_report(&edges);
        assert_eq!(
            report,
            "cycle: a, b\n    a -> b  (k/src/a.rs:1)\n    b -> a  (k/src/a.rs:2)\n"
        );
        edges.remove(&m("b"));
        assert_eq!(cycle_report(&edges), "");
    }

    #[test]
    fn pb_means_the_module() {
        assert!(names_pb("use hotswap_common::pb::Deployment;"));
        assert!(names_pb("fn f(x: pb::Hello) {}"));
        assert!(!names_pb("let xpb::y = 1; use hotswap_common::pb;"));
    }
}
