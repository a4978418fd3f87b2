//! Maps a path inside the YAML document (`listeners[0].routes[2].cluster`) to its line and column.
//!
//! serde gives us values without positions, so errors found after deserialization (an unknown cluster,
//! a bad regex) would have no location. This module walks the same text once with a position-aware
//! event parser and records where each key and sequence item starts. Paths use the format of
//! `serde_path_to_error`, so shape errors and semantic errors are located the same way.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in the config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// Positions of every key and sequence item in a YAML document.
#[derive(Debug, Default)]
pub struct Locator {
    positions: HashMap<String, Position>,
}

impl Locator {
    /// Indexes `text`; a document the event parser cannot read yields an empty index.
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            positions: builder.positions,
        }
    }

    /// Position of `path`, or of its nearest ancestor that has one, or the start of the file.
    pub fn find(&self, path: &str) -> Position {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return *pos;
            }
            match parent(path) {
                Some(p) => path = p,
                None => return Position { line: 1, column: 1 },
            }
        }
    }
}

/// Strips the last segment: `a.b[3]` -> `a.b`, `a.b` -> `a`, `a` -> None.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    Map {
        path: String,
        expecting_key: bool,
        value_path: String,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
}

impl Builder {
    fn record(&mut self, path: &str, mark: Marker) {
        self.positions.entry(path.to_owned()).or_insert(Position {
            line: mark.line(),
            column: mark.col() + 1,
        });
    }

    /// Path of a node that starts now, recording a key on the way; None for a key node.
    fn node_path(&mut self, ev: &Event, mark: Marker) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map {
                path,
                expecting_key,
                value_path,
            }) => {
                if *expecting_key {
                    let key = match ev {
                        Event::Scalar(k, ..) => k.as_str(),
                        _ => "?",
                    };
                    *value_path = join(path, key);
                    *expecting_key = false;
                    let (map, p) = (path.clone(), value_path.clone());
                    // A block mapping's own event points past its first key; the key is where
                    // users look for it.
                    self.record(&map, mark);
                    self.record(&p, mark);
                    None
                } else {
                    *expecting_key = true;
                    Some(value_path.clone())
                }
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                if !matches!(ev, Event::MappingStart(..)) {
                    self.record(&p, mark);
                }
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                let _ = self.node_path(&ev, mark);
            }
            Event::MappingStart(..) => {
                if let Some(path) = self.node_path(&ev, mark) {
                    self.stack.push(Frame::Map {
                        path,
                        expecting_key: true,
                        value_path: String::new(),
                    });
                } else {
                    // A complex key: swallow its contents under a placeholder frame.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        expecting_key: true,
                        value_path: String::new(),
                    });
                }
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(&ev, mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_falls_back_to_parents() {
        let text = "admin:\n  address: 1.2.3.4:5\nlisteners:\n  - name: a\n    routes:\n      - name: r\n        cluster: x\n";
        let loc = Locator::new(text);
        assert_eq!(loc.find("admin.address"), Position { line: 2, column: 3 });
        assert_eq!(loc.find("listeners[0]"), Position { line: 4, column: 5 });
        assert_eq!(
            loc.find("listeners[0].routes[0].cluster"),
            Position { line: 7, column: 9 }
        );
        assert_eq!(
            loc.find("listeners[0].routes[0].missing"),
            Position { line: 6, column: 9 }
        );
        assert_eq!(loc.find("nothing.here"), Position { line: 1, column: 1 });
    }

    #[test]
    fn flow_sequences_are_indexed() {
        let loc = Locator::new("clusters:\n  - name: c\n    endpoints: [a:1, b:2]\n");
        assert_eq!(
            loc.find("clusters[0].endpoints[1]"),
            Position {
                line: 3,
                column: 22
            }
        );
    }
}
