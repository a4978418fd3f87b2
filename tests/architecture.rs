//! The import direction of `src/`, checked on every test run: the data path uses the control side
//! and telemetry, never the reverse, and no two top-level modules import each other.
//!
//! Every `crate::…` path outside comments counts (a `use`, or a path written inline). Each
//! top-level module has a layer; a module may only use modules of lower layers. A new top-level
//! module must be given its layer here, which is the moment to decide where it belongs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the top (the composition root) down to the leaves.
const LAYERS: &[(&str, u8)] = &[
    ("demo", 8),
    ("app", 7),
    ("proxy", 6),
    ("control", 5),
    ("tls", 4),
    ("watch", 3),
    ("telemetry", 2),
    ("error", 1),
    ("tasks", 1),
    ("rng", 1),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to; `None` for the crate root files.
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The top-level modules a source text names as `crate::NAME`, comments left out.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
            rest = after;
        }
    }
    found
}

/// Every edge (from, to) between different top-level modules, with a file that makes it.
fn edges() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 40,
        "found only {} files under src/",
        files.len()
    );
    let mut edges = BTreeMap::new();
    for file in files {
        let Some(from) = owner(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for to in uses(&text) {
            if to != from {
                let shown = file.strip_prefix(&src).unwrap().display().to_string();
                edges.entry((from.clone(), to)).or_insert(shown);
            }
        }
    }
    edges
}

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| {
            panic!("top-level module `{module}` has no layer in tests/architecture.rs")
        })
}

#[test]
fn the_scanner_sees_comments_apart_from_code() {
    let text = "use crate::proxy::x; // crate::app\n/// see [`crate::telemetry`]\nlet a = crate::rng::Rng::with_seed(1);\n";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(found, ["proxy", "rng"]);
}

#[test]
fn control_and_telemetry_never_import_the_data_path_or_the_root() {
    let edges = edges();
    assert!(
        edges.contains_key(&("proxy".into(), "control".into())),
        "the scan found no proxy -> control import; is it reading src/?"
    );
    let wrong: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| {
            matches!(from.as_str(), "control" | "telemetry")
                && matches!(to.as_str(), "proxy" | "app")
        })
        .map(|((from, to), file)| format!("{from} -> {to} (in src/{file})"))
        .collect();
    assert!(
        wrong.is_empty(),
        "imports against the direction: {wrong:#?}"
    );
}

#[test]
fn every_import_goes_down_a_layer_so_there_is_no_cycle() {
    let edges = edges();
    let up: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| layer(to) >= layer(from))
        .map(|((from, to), file)| format!("{from} -> {to} (in src/{file})"))
        .collect();
    assert!(
        up.is_empty(),
        "imports that do not go down a layer: {up:#?}"
    );
    // Independent of the layer table: a depth-first search over the module graph.
    let graph: BTreeMap<&str, Vec<&str>> =
        edges.keys().fold(BTreeMap::new(), |mut g, (from, to)| {
            g.entry(from.as_str()).or_default().push(to.as_str());
            g
        });
    fn visit<'a>(
        n: &'a str,
        g: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == n) {
            panic!("import cycle: {:?}", &path[i..]);
        }
        if !done.insert(n) {
            return;
        }
        path.push(n);
        for next in g.get(n).into_iter().flatten() {
            visit(next, g, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done);
    }
}
