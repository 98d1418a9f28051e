//! Where a setting was written: the file and the line of each key, so that a mistake found
//! later (in the database's catalog, at `migrate` or at start) points at the line to fix.

use std::collections::BTreeMap;

/// The file and lines of one event type (or one relation) as its TOML file declared it.
/// Empty for an event type built in code: its errors then name the event type and the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The file (as given), when read from one.
    file: Option<String>,
    /// The line of its table (`[[event_type]]`, `[event_type.relations.x]`).
    line: usize,
    /// The line of each key path (`status_column`, `ignore.views`, `fields.geo.lat`).
    lines: BTreeMap<String, usize>,
}

impl Origin {
    /// Declared in `file` by the table that starts on `line`.
    pub(crate) fn in_file(file: &str, line: usize) -> Self {
        Self {
            file: Some(file.to_owned()),
            line,
            lines: BTreeMap::new(),
        }
    }

    /// Records that `path` was written on `line`.
    pub(crate) fn note(&mut self, path: impl Into<String>, line: usize) {
        self.lines.insert(path.into(), line);
    }

    /// `file:line` of `path` (the nearest enclosing key that has a line, else the table's);
    /// `None` for an event type built in code.
    pub(crate) fn place(&self, path: &str) -> Option<String> {
        let file = self.file.as_deref()?;
        let mut key = path;
        let line = loop {
            if let Some(line) = self.lines.get(key) {
                break *line;
            }
            match key.rsplit_once('.') {
                Some((outer, _)) => key = outer,
                None => break self.line,
            }
        };
        Some(format!("{file}:{line}"))
    }

    /// The prefix of a message about `path`: `file:line: ` or nothing.
    pub(crate) fn prefix(&self, path: &str) -> String {
        self.place(path).map_or(String::new(), |p| format!("{p}: "))
    }
}

/// The line (from 1) of byte `offset` of `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |before| before.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_falls_back_to_its_enclosing_key_then_to_the_table() {
        let mut origin = Origin::in_file("f.toml", 3);
        origin.note("fields.geo", 9);
        origin.note("fields.geo.lat", 10);
        assert_eq!(origin.place("fields.geo.lat").as_deref(), Some("f.toml:10"));
        assert_eq!(origin.place("fields.geo.lon").as_deref(), Some("f.toml:9"));
        assert_eq!(origin.place("key").as_deref(), Some("f.toml:3"));
        assert_eq!(Origin::default().place("key"), None);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
