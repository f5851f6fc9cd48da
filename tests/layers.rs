//! Architecture test: every module under `src/` sits in a layer and may only refer to
//! modules of its own layer or lower ones, and module references form no cycle.
//!
//! It reads the source text (std only, no parser crate): a small lexer drops comments,
//! strings and char literals, `#[cfg(test)] mod … { … }` blocks are skipped (tests may reach
//! anywhere), and every `crate::…`, `super::…`, `self::…` path (including `use` groups) is
//! mapped to the longest module known from the file tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The target architecture: (module prefix, layer, what it is). Longest prefix wins.
const LAYERS: &[(&str, u8, &str)] = &[
    ("time", 0, "primitives, depend on nothing"),
    ("line_writer", 0, "primitives, depend on nothing"),
    ("net", 0, "primitives, depend on nothing"),
    ("random", 0, "primitives, depend on nothing"),
    ("h1", 0, "primitives, depend on nothing"),
    ("worker", 0, "primitives, depend on nothing"),
    ("sd_notify", 0, "primitives, depend on nothing"),
    ("proxy_header", 0, "primitives, depend on nothing"),
    ("tls", 0, "primitives, depend on nothing"),
    ("affinity::hash", 0, "primitives, depend on nothing"),
    ("affinity::token", 0, "primitives, depend on nothing"),
    ("affinity::stick_table", 0, "primitives, depend on nothing"),
    ("affinity::maglev", 0, "primitives, depend on nothing"),
    ("config", 1, "configuration"),
    ("balance", 2, "building blocks"),
    ("affinity::cookies", 2, "building blocks"),
    ("affinity::verdict", 2, "building blocks"),
    ("access_log", 2, "building blocks"),
    ("backend", 2, "building blocks"),
    ("retry", 2, "building blocks"),
    ("upstream", 2, "building blocks"),
    ("dns", 2, "building blocks"),
    ("affinity", 3, "policy: decide where a request goes, keep state right"),
    ("pool", 3, "policy: decide where a request goes, keep state right"),
    ("split", 3, "policy: decide where a request goes, keep state right"),
    ("health", 3, "policy: decide where a request goes, keep state right"),
    ("state", 3, "policy: decide where a request goes, keep state right"),
    ("housekeeping", 3, "policy: decide where a request goes, keep state right"),
    ("store", 3, "policy: decide where a request goes, keep state right"),
    ("proxy", 4, "data path"),
    ("listener", 4, "data path"),
    ("simulate", 4, "simulation: the policy code in simulated time, beside the data path"),
    ("control", 5, "control: change a running Tether"),
    ("warm", 5, "control: change a running Tether"),
    ("discovery", 5, "control: change a running Tether"),
    ("fleet", 5, "control: change a running Tether"),
    ("upgrade", 5, "control: change a running Tether"),
    ("admin", 6, "operator interface"),
    ("server", 7, "entry points"),
    ("demo", 7, "entry points"),
    ("cli", 7, "entry points"),
];

/// The layer entry for a module: the longest prefix (whole path segments) that matches.
fn layer_of(module: &str) -> Option<(u8, &'static str)> {
    let matches = |p: &str| module == p || module.strip_prefix(p).is_some_and(|rest| rest.starts_with("::"));
    LAYERS.iter().filter(|(p, ..)| matches(p)).max_by_key(|(p, ..)| p.len()).map(|&(_, layer, what)| (layer, what))
}

/// A token of Rust source with its line number. Comments, strings and chars never become tokens.
#[derive(Clone)]
struct Tok {
    text: String,
    line: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Splits source into identifiers and punctuation (`::` is one token), dropping whitespace,
/// comments (nested `/* */` too), string literals (raw, byte, C) and char literals.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    // Skips a string body starting at `i`; `raw` is the number of `#`s of a raw string.
    let skip_string = |mut i: usize, raw: Option<usize>, line: &mut usize| {
        while i < c.len() {
            match c[i] {
                '\\' if raw.is_none() => i += 1, // skip the escaped char (a newline is counted below)
                '"' if (1..=raw.unwrap_or(0)).all(|k| at(i + k) == '#') => return i + 1 + raw.unwrap_or(0),
                _ => {}
            }
            *line += usize::from(at(i) == '\n');
            i += 1;
        }
        i
    };
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            line += usize::from(ch == '\n');
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            i += c[i..].iter().take_while(|&&x| x != '\n').count();
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    (depth, i) = (depth + 1, i + 2);
                } else if c[i] == '*' && at(i + 1) == '/' {
                    (depth, i) = (depth - 1, i + 2);
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(i + 1, None, &mut line);
        } else if ch == '\'' && at(i + 1) == '\\' {
            // An escaped char literal: '\n', '\'', '\u{1F600}'. Its closing quote is after `i + 2`.
            i += 4 + c.iter().skip(i + 3).take_while(|&&x| x != '\'').count();
        } else if ch == '\'' && at(i + 2) == '\'' {
            i += 3; // a plain char literal such as '"' or '{'
        } else if is_ident_char(ch) {
            let word: String = c[i..].iter().take_while(|&&x| is_ident_char(x)).collect();
            i += word.chars().count();
            let hashes = (i..).take_while(|&j| at(j) == '#').count();
            if matches!(word.as_str(), "r" | "br" | "cr") && at(i + hashes) == '"' {
                i = skip_string(i + hashes + 1, Some(hashes), &mut line);
            } else {
                out.push(Tok { text: word, line }); // b"…", b'…' and c"…" lex as `b` + literal
            }
        } else {
            let two = ch == ':' && at(i + 1) == ':';
            out.push(Tok { text: if two { "::".into() } else { ch.into() }, line });
            i += if two { 2 } else { 1 };
        }
    }
    out
}

/// Drops `#[cfg(test)]` items: `mod name { … }` blocks (braces tracked) and `use …;`.
fn drop_test_code(toks: Vec<Tok>) -> Vec<Tok> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let text = |i: usize| toks.get(i).map_or("", |t: &Tok| t.text.as_str());
    let (mut out, mut i) = (Vec::new(), 0);
    while i < toks.len() {
        if !(0..CFG_TEST.len()).all(|k| text(i + k) == CFG_TEST[k]) {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        let mut j = i + CFG_TEST.len();
        // Look past further attributes and a visibility to see which item it is.
        let mut depth = 0;
        while j < toks.len() && (depth > 0 || matches!(text(j), "#" | "[" | "pub" | "(")) {
            depth += i32::from(matches!(text(j), "[" | "(")) - i32::from(matches!(text(j), "]" | ")"));
            j += 1;
        }
        let end = if text(j) == "mod" && text(j + 2) == "{" { "}" } else { ";" };
        if text(j) == "use" || end == "}" {
            depth = 0;
            while j < toks.len() {
                depth += i32::from(text(j) == "{") - i32::from(text(j) == "}");
                j += 1;
                if depth == 0 && text(j - 1) == end {
                    break;
                }
            }
        }
        i = j;
    }
    out
}

/// Reads one path (or `use` tree) starting at `toks[i]`, resolving each segment against
/// `path` (`crate` resets it, `super` pops, `self` keeps it). Pushes each full path with
/// its line to `out` and returns the index of the first token after the path.
fn path_tree(toks: &[Tok], mut i: usize, mut path: Vec<String>, out: &mut Vec<(Vec<String>, usize)>) -> usize {
    let text = |i: usize| toks.get(i).map_or("", |t: &Tok| t.text.as_str());
    let line = toks.get(i).map_or(0, |t| t.line);
    loop {
        match text(i) {
            "{" => {
                i += 1;
                while !matches!(text(i), "}" | "") {
                    i = path_tree(toks, i, path.clone(), out);
                    i += (i..).take_while(|&j| !matches!(text(j), "," | "}" | "")).count(); // `as name`
                    i += usize::from(text(i) == ",");
                }
                return i + 1;
            }
            "crate" | "$crate" => path.clear(),
            "super" => drop(path.pop()),
            "self" => {}
            t if t.starts_with(is_ident_char) => path.push(t.to_string()),
            _ => break, // `*` or anything else ends the path
        }
        i += 1;
        if text(i) != "::" {
            break;
        }
        i += 1;
    }
    out.push((path, line));
    i
}

/// The crate modules one file refers to, with the first line of each reference.
/// `module` is the file's module path; `known` is every module path of the crate.
/// Paths may start with `crate`, `super`, `self` or the name of one of the module's children.
fn references(module: &str, src: &str, known: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let toks = drop_test_code(lex(src));
    let here: Vec<String> = module.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
    let child_prefix = if module.is_empty() { String::new() } else { format!("{module}::") };
    let is_child = |name: &str| known.contains(&format!("{child_prefix}{name}"));
    let mut paths = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (t, prev) = (toks[i].text.as_str(), if i > 0 { toks[i - 1].text.as_str() } else { "" });
        let head = matches!(t, "crate" | "$crate" | "super" | "self") || is_child(t);
        if head && toks.get(i + 1).is_some_and(|n| n.text == "::") && prev != "::" && prev != "." {
            i = path_tree(&toks, i, here.clone(), &mut paths);
        } else {
            i += 1;
        }
    }
    let mut found = BTreeMap::new();
    for (segs, line) in paths {
        // The longest known module the path names: `affinity::token::KeyRing` → `affinity::token`.
        let target = (1..=segs.len()).rev().map(|k| segs[..k].join("::")).find(|m| known.contains(m));
        if let Some(target) = target.filter(|t| t != module) {
            found.entry(target).or_insert(line);
        }
    }
    found
}

/// Every `.rs` file under `dir`, as paths relative to `root`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

/// A file's module path: `a/b.rs` → `a::b`, `a/mod.rs` → `a`. None for the crate root and
/// for `tests.rs` files under a module directory (test code).
fn module_of(rel: &Path) -> Option<String> {
    let mut parts: Vec<String> = rel.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.last()?.clone();
    if parts.len() == 1 && (last == "lib" || last == "main") || parts.len() > 1 && last == "tests" {
        return None;
    }
    if last == "mod" {
        parts.pop();
    }
    Some(parts.join("::"))
}

/// The scanned crate: module → (file, {referenced module → line}).
type Graph = BTreeMap<String, (String, BTreeMap<String, usize>)>;

fn scan() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    let modules: Vec<(String, PathBuf)> = files.into_iter().filter_map(|f| Some((module_of(&f)?, f))).collect();
    let known: BTreeSet<String> = modules.iter().map(|(m, _)| m.clone()).collect();
    let read = |rel: &Path| std::fs::read_to_string(src.join(rel)).unwrap();
    let file = |m: &str, rel: &Path| (format!("src/{}", rel.display()), references(m, &read(rel), &known));
    modules.iter().map(|(m, rel)| (m.clone(), file(m, rel))).collect()
}

#[test]
fn scan_finds_the_crate() {
    let graph = scan();
    let refs: usize = graph.values().map(|(_, r)| r.len()).sum();
    assert!(graph.len() >= 20, "only {} modules found under src/: {:?}", graph.len(), graph.keys());
    assert!(refs >= 30, "only {refs} module references found under src/");
}

#[test]
fn modules_respect_layers() {
    let graph = scan();
    let mut problems = Vec::new();
    for (module, (file, refs)) in &graph {
        let Some((layer, what)) = layer_of(module) else {
            problems.push(format!("{file}: module `{module}` has no layer: add it to the LAYERS table"));
            continue;
        };
        for (target, line) in refs {
            // (A target without a layer is reported as a module of its own.)
            if let Some((to, to_what)) = layer_of(target).filter(|&(to, _)| to > layer) {
                problems.push(format!(
                    "{file}:{line}: `{module}` (layer {layer}, {what}) refers to `{target}` (layer {to}, {to_what})"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{} layering violation(s):\n{}", problems.len(), problems.join("\n"));
}

/// `simulate` sits beside the data path (above the policy code it runs) but runs that code
/// alone: it may not refer to the data path, sockets or a running server.
#[test]
fn simulate_stays_off_the_data_path() {
    const FORBIDDEN: [&str; 8] = ["proxy", "listener", "server", "upstream", "health", "control", "admin", "store"];
    let graph = scan();
    let under = |m: &str, p: &str| m == p || m.strip_prefix(p).is_some_and(|rest| rest.starts_with("::"));
    let sim: Vec<_> = graph.iter().filter(|(m, _)| under(m, "simulate")).collect();
    assert!(sim.len() >= 3, "simulate's modules not found: {:?}", graph.keys());
    let mut problems = Vec::new();
    for (module, (file, refs)) in sim {
        for (target, line) in refs {
            if FORBIDDEN.iter().any(|f| under(target, f)) {
                problems.push(format!("{file}:{line}: `{module}` refers to `{target}`"));
            }
        }
    }
    assert!(problems.is_empty(), "simulate reaches the data path:\n{}", problems.join("\n"));
}

/// Whether one module is the other's ancestor: a module and its own submodules are one
/// unit (`backend` holds a `backend::health::BackendHealth`, whose code implements
/// `Backend`), so references between them are not cycles. Siblings are separate units.
fn related(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x.strip_prefix(y).is_some_and(|rest| rest.starts_with("::"));
    under(a, b) || under(b, a)
}

/// Every elementary cycle, each listed once, starting from its smallest module.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn walk(graph: &Graph, path: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
        let (start, last) = (path[0].clone(), path[path.len() - 1].clone());
        let targets = graph.get(&last).map(|(_, r)| r.keys()).into_iter().flatten();
        for next in targets.filter(|next| !related(&last, next)) {
            if *next == start {
                found.push([&path[..], std::slice::from_ref(&start)].concat());
            } else if *next > start && !path.contains(next) {
                path.push(next.clone());
                walk(graph, path, found);
                path.pop();
            }
        }
    }
    let mut found = Vec::new();
    for start in graph.keys() {
        walk(graph, &mut vec![start.clone()], &mut found);
    }
    found
}

#[test]
fn cycles_are_found_between_siblings_not_within_a_module() {
    let graph: Graph = [
        ("a", vec!["a::x"]),
        ("a::x", vec!["a", "b::y"]),
        ("b", vec![]),
        ("b::y", vec!["b::z"]),
        ("b::z", vec!["a::x"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_string(), (String::new(), to.into_iter().map(|t| (t.to_string(), 1)).collect())))
    .collect();
    let found: Vec<String> = cycles(&graph).iter().map(|c| c.join(" -> ")).collect();
    assert_eq!(found, ["a::x -> b::y -> b::z -> a::x"]);
}

#[test]
fn modules_form_no_cycle() {
    let found: Vec<String> = cycles(&scan()).iter().map(|c| c.join(" -> ")).collect();
    assert!(found.is_empty(), "{} module cycle(s):\n{}", found.len(), found.join("\n"));
}

/// Tests of the reader itself, so that the architecture tests cannot pass vacuously.
mod parser {
    use super::*;

    fn refs(module: &str, src: &str) -> Vec<String> {
        let known =
            ["a", "a::b", "c", "x", "proxy", "proxy::body", "proxy::conn", "time", "affinity", "affinity::token"];
        let known: BTreeSet<String> = known.iter().map(|s| s.to_string()).collect();
        references(module, src, &known).into_keys().collect()
    }

    #[test]
    fn grouped_use_across_lines() {
        assert_eq!(refs("x", "use crate::{\n    a::b::{Thing, other as o},\n    c,\n};"), ["a::b", "c"]);
        assert_eq!(refs("x", "use crate::{a::{self, b}};"), ["a", "a::b"]);
    }

    #[test]
    fn paths_in_expressions_map_to_the_longest_module() {
        assert_eq!(refs("x", "fn f() { let v = crate::c::f(1) + crate::a::b::C; }"), ["a::b", "c"]);
        assert_eq!(refs("x", "type K = crate::affinity::token::KeyRing;"), ["affinity::token"]);
        assert_eq!(refs("x", "fn f(v: crate::affinity::Verdict) {}"), ["affinity"]);
        let found = references("x", "\n\nfn f() { crate::c::g() }", &["c".to_string()].into());
        assert_eq!(found.get("c"), Some(&3), "the line of the reference");
    }

    #[test]
    fn super_and_self_resolve_against_the_module() {
        assert_eq!(
            refs("proxy::body", "use super::conn::ConnCx;\nfn f() { super::Shared::new() }"),
            ["proxy", "proxy::conn"]
        );
        // A `mod.rs` file is its directory's module: its super is the crate root.
        assert_eq!(refs("proxy", "fn f() { super::time::now(); self::conn::serve() }"), ["proxy::conn", "time"]);
        assert_eq!(refs("proxy::conn", "use super::super::a::b;"), ["a::b"]);
        // Self-references and `mod` declarations are not references.
        assert!(refs("proxy", "pub mod conn;\nuse self::Thing;\nuse crate::proxy::X;").is_empty());
        // Bare paths into a child module count; method turbofish and other crates do not.
        assert_eq!(refs("affinity", "use token::Key;\nfn f() { x.token::<u8>(); std::token::A }"), ["affinity::token"]);
    }

    #[test]
    fn comments_strings_and_test_modules_are_ignored() {
        let src = r###"
            // use crate::a;
            /// crate::a::b in docs
            //! crate::a
            /* crate::a /* nested crate::a */ crate::a */
            fn f<'l>(s: &'l str) -> char {
                let _ = ("crate::a::b", "esc \" crate::a", r#"raw " crate::a"#, b"crate::a", '"');
                let _ = ('{', '\'', '\u{7b}');
                crate::c::g();
                '}'
            }
            #[cfg(test)]
            #[allow(unused)]
            mod tests {
                use crate::a::b;
                fn t() { if true { crate::a::f() } }
            }
            #[cfg(test)]
            use crate::a;
            fn after() { crate::time::now() }
        "###;
        assert_eq!(refs("x", src), ["c", "time"]);
    }
}
