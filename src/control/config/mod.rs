//! Configuration: the YAML model, its validation into typed settings, and hot reload.
//!
//! Loading goes text -> [`model::RawConfig`] (shape, via serde_yaml) -> [`Config`] (meaning, via
//! [`validate`]). Every error carries `FILE:LINE:COLUMN`. serde_yaml is used only in this module so
//! that a maintained fork can replace it in one place.

pub mod explain;
pub mod locate;
pub mod mesh;
pub mod model;
pub mod resilience;
pub mod tls;
pub mod upstream;
pub mod validate;

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use locate::Locator;
pub use model::{ListenerProtocol, RawConfig, UpstreamProtocol};
pub use validate::{
    ClusterConfig, Config, HeaderMatch, HeaderValueMatch, Limits, ListenerConfig, ListenerKind,
    PathMatch, Problem, RouteConfig, RouteMatch,
};

/// The default config compiled into the binary, used when no file is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../../../config/outrigger.yaml");
/// The name the embedded config is reported under.
pub const EMBEDDED_NAME: &str = "<embedded>/config/outrigger.yaml";

/// One located error in a config file, printed as `FILE:LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File name as given by the user.
    pub file: String,
    /// 1-based line; 0 when the error concerns the file as a whole.
    pub line: usize,
    /// 1-based column; 0 when the error concerns the file as a whole.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How it might be fixed.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// Every error found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A validated config together with the text it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The typed config.
    pub config: Config,
    /// The raw document, for display on the admin page.
    pub raw: RawConfig,
    /// The file name it was read from.
    pub file: String,
    /// SHA-256 of the text, hex.
    pub hash: String,
}

/// Reads and validates the config at `path`; relative paths in it are taken from its folder.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_in(&file, &text, path.parent()),
        Err(e) => Err(ConfigErrors(vec![Diagnostic {
            file,
            line: 0,
            column: 0,
            message: format!("cannot read config: {e}"),
            hint: None,
        }])),
    }
}

/// Validates the embedded default config.
pub fn load_embedded() -> Result<Loaded, ConfigErrors> {
    parse(EMBEDDED_NAME, EMBEDDED_CONFIG)
}

/// Parses and validates config `text`, naming `file` in errors; relative paths in it are taken
/// from the working directory.
pub fn parse(file: &str, text: &str) -> Result<Loaded, ConfigErrors> {
    parse_in(file, text, None)
}

/// Parses and validates config `text` read from `file` in folder `dir`, against which relative
/// paths in it are resolved.
pub fn parse_in(file: &str, text: &str, dir: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    let hash = hash_text(text);
    // Most files have the right shape: deserializing them straight from the text skips building
    // a YAML value tree and a position index (a third of a 10,000-route reload). Only a file with
    // a shape error takes the slower path, which locates every problem.
    let raw = match serde_yaml::from_str::<Option<RawConfig>>(text) {
        Ok(raw) => raw.unwrap_or_default(),
        Err(_) => shape_of(file, text)?,
    };
    match validate::validate_in(&raw, dir) {
        Ok(config) => Ok(Loaded {
            config,
            raw,
            file: file.to_owned(),
            hash,
        }),
        Err(problems) => {
            let locator = Locator::new(text);
            let mut diags: Vec<Diagnostic> = problems
                .into_iter()
                .map(|p| located(file, &locator, p))
                .collect();
            diags.sort_by_key(|d| (d.line, d.column));
            Err(ConfigErrors(diags))
        }
    }
}

/// `p` at its line and column in `file`.
fn located(file: &str, locator: &Locator, p: Problem) -> Diagnostic {
    let pos = locator.find(&p.path);
    Diagnostic {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        message: p.message,
        hint: p.hint,
    }
}

/// Reads `text` through a YAML value tree, so that every shape error (not only the first) is
/// reported with its position.
fn shape_of(file: &str, text: &str) -> Result<RawConfig, ConfigErrors> {
    let doc: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(serde_yaml::Value::Null) => serde_yaml::Value::Mapping(Default::default()),
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            return Err(ConfigErrors(vec![Diagnostic {
                file: file.to_owned(),
                line,
                column,
                message: strip_position(&e.to_string()),
                hint: None,
            }]));
        }
    };
    let first = match shape::<RawConfig>("", doc.clone()) {
        Ok(raw) => return Ok(raw),
        Err(first) => first,
    };
    let locator = Locator::new(text);
    let mut problems = vec![first];
    // Check list items one by one so that one typo does not hide the next.
    for (section, check) in [
        ("listeners", check::<model::RawListener> as Checker),
        ("clusters", check::<model::RawCluster> as Checker),
    ] {
        if let Some(serde_yaml::Value::Sequence(items)) = doc.get(section) {
            for (i, item) in items.iter().enumerate() {
                if let Err(p) = check(&format!("{section}[{i}]"), item.clone()) {
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
            }
        }
    }
    problems.sort_by_key(|p| {
        let pos = locator.find(&p.path);
        (pos.line, pos.column)
    });
    Err(ConfigErrors(
        problems
            .into_iter()
            .map(|p| located(file, &locator, p))
            .collect(),
    ))
}

type Checker = fn(&str, serde_yaml::Value) -> Result<(), Problem>;

fn check<T: DeserializeOwned>(base: &str, value: serde_yaml::Value) -> Result<(), Problem> {
    shape::<T>(base, value).map(drop)
}

/// Deserializes `value` (found at `base`) as `T`, turning a serde error into a located problem.
fn shape<T: DeserializeOwned>(base: &str, value: serde_yaml::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let inner = e.path().to_string();
        let mut path = match (base.is_empty(), inner.as_str()) {
            (_, ".") => base.to_owned(),
            (true, p) => p.to_owned(),
            (false, p) if p.starts_with('[') => format!("{base}{p}"),
            (false, p) => format!("{base}.{p}"),
        };
        let message = e.into_inner().to_string();
        let (message, hint) = explain(&message);
        if let Some(field) = message.strip_prefix("unknown field `") {
            // serde reports the struct; point at the offending key itself.
            let field = field.trim_end_matches('`');
            path = if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
        }
        Problem {
            path,
            message,
            hint,
        }
    })
}

/// Shortens serde's "unknown field `x`, expected one of ..." into a message and a suggestion.
fn explain(message: &str) -> (String, Option<String>) {
    let Some((head, expected)) = message.split_once(", expected") else {
        return (message.to_owned(), None);
    };
    let unknown = head
        .strip_prefix("unknown field `")
        .or_else(|| head.strip_prefix("unknown variant `"))
        .map(|s| s.trim_end_matches('`'));
    let Some(word) = unknown else {
        return (message.to_owned(), None);
    };
    if word == "cluster" && head.starts_with("unknown field") && expected.contains("`listeners`") {
        return (
            head.to_owned(),
            Some("the embedded Raft group's section is `mesh:` (`clusters:` are upstreams)".into()),
        );
    }
    let choices: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let hint = match validate::nearest(word, choices.iter().copied()) {
        Some(n) => format!("did you mean `{n}`?"),
        None => format!("expected one of {}", quote_list(&choices)),
    };
    (head.to_owned(), Some(hint))
}

fn quote_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// serde_yaml appends " at line L column C"; the diagnostic prefix already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// SHA-256 of a config text as lowercase hex: the config's identity on the admin page and in reloads.
pub fn hash_text(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse("t.yaml", text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let loaded = load_embedded().unwrap();
        assert_eq!(loaded.config.listeners.len(), 2);
        assert_eq!(loaded.config.admin_address.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn misspelled_field_is_located_with_a_hint() {
        let text = "clusters:\n  - name: a\n    endpoints: [127.0.0.1:1]\n    conect_timeout: 1s\n";
        let errs = errors(text);
        assert_eq!(
            errs,
            vec!["t.yaml:4:5: unknown field `conect_timeout` (hint: did you mean `connect_timeout`?)"]
        );
    }

    #[test]
    fn every_bad_item_is_reported() {
        let text = "listeners:\n  - name: a\n    adress: 127.0.0.1:1\n  - name: b\n    address: 127.0.0.1:2\n    protcol: http\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("t.yaml:3:5: unknown field `adress`"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.yaml:6:5: unknown field `protcol`"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_cluster_reference_is_located() {
        let text = "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: bakend\nclusters:\n  - name: backend\n    endpoints: [127.0.0.1:1]\n";
        assert_eq!(
            errors(text),
            vec!["t.yaml:6:9: unknown cluster `bakend` (hint: did you mean `backend`?)"]
        );
    }

    #[test]
    fn resilience_errors_are_located_with_hints() {
        let text = "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: r
        cluster: c
        timeout: 1s
        retry:
          retry_on: [gateway-eror]
          grpc_codes: [unavailabel]
          per_try_timeout: 2s
        rate_limit: { requests_per_second: 0 }
  - name: raw
    address: 127.0.0.1:0
    protocol: tcp
    cluster: c
    load_shed: {}
clusters:
  - name: c
    endpoints: [127.0.0.1:1]
    circuit_breaker: { failure_rate: 150, window_calls: 10, window_duration: 10s }
";
        let errs = errors(text);
        let expect = [
            "t.yaml:21:24: failure_rate is a percentage, at most 100",
            "t.yaml:21:43: give either `window_calls` or `window_duration`, not both",
            "t.yaml:9:22: unknown retry condition `gateway-eror` (hint: did you mean `gateway-error`?)",
            "t.yaml:10:24: `unavailabel` is not a retryable gRPC status (hint: did you mean `unavailable`?)",
            "t.yaml:11:11: per_try_timeout (2s) is longer than the route timeout (1s)",
            "t.yaml:12:23: requests_per_second must be greater than 0",
            "t.yaml:17:5: `load_shed` applies to http listeners only",
        ];
        for e in expect {
            assert!(
                errs.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
    }

    #[test]
    fn syntax_errors_carry_position() {
        let errs = errors("listeners:\n  - name: [unclosed\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("t.yaml:3:"), "{errs:?}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = "\
listeners:
  - name: in
    address: 127.0.0.1:7000
    routes:
      - name: r
        match: { regex: '([a-z' }
        weighted_clusters: [{cluster: c, weight: 0}]
  - name: in
    address: 0.0.0.0:7000
    protocol: tcp
    cluster: nope
clusters:
  - name: c
    endpoints: [not an endpoint]
";
        let errs = errors(text);
        let joined = errs.join("\n");
        for needle in [
            "t.yaml:6:18: invalid regex `([a-z`: unclosed character class",
            "t.yaml:7:9: weights sum to zero",
            "t.yaml:8:5: duplicate listener name `in`",
            "t.yaml:9:5: address 0.0.0.0:7000 overlaps with listener `in`",
            "t.yaml:11:5: unknown cluster `nope`",
            "t.yaml:14:17: invalid endpoint `not an endpoint`",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn reserved_cluster_section_explains_itself() {
        let errs = errors("cluster:\n  peers: []\n");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].contains("the embedded Raft group's section is `mesh:`"),
            "{errs:?}"
        );
    }
}
