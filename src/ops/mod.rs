//! What an operator reads: `ctmirror status` and `ctmirror status --follow`
//! (and, in [`resync`], which pairs an operator's `ctmirror resync` covers).
//!
//! Why this exists: when a mirror is late or broken, whoever is on call must
//! be able to tell from one command, without a debugger or SQL, which pairs
//! run where, which fail and why, how far each table is behind and whether a
//! running cycle is making progress. Everything here reads
//! [`ControlDb::status`](crate::control::ControlDb::status), one snapshot of
//! the control database, and turns it into text.
//!
//! - [`render`] is the whole `status` screen, a pure function of the pairs and
//!   "now" so it is tested without a database.
//! - [`FollowState`] turns successive snapshots into the changes between
//!   them (a run started, a table progressed, a run ended); [`follow`] polls
//!   and shows those changes as progress bars on a terminal or as one plain
//!   line per change elsewhere (pipes, CI, log files).
//!
//! Two things to keep in mind when reading the output:
//!
//! - Lag is counted in source versions (SQL Server change-tracking versions,
//!   or transaction ids for the PostgreSQL trigger backend), not rows or
//!   seconds, and it is as of the last cycle's view of the source: the
//!   source version is recorded when a cycle runs, so a table can show lag 0
//!   while the source has moved on since. A cursor ahead of that recorded
//!   version is not a negative lag but a sign the recorded version is stale
//!   (or the source was restored), and is said so.
//! - Error messages come from remote servers (receivers, sources). They are
//!   never printed raw: control characters and escape sequences could
//!   rewrite an operator's terminal, so they are replaced with spaces and
//!   long messages are cut short (see [`sanitize`]).

mod follow;
pub mod resync;
mod status;

pub use follow::{follow, FollowEvent, FollowState};
pub use status::{print_status, render};

use crate::protocol::Cursor;
use chrono::{DateTime, Utc};

/// How many characters of a remote message are shown.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// How many characters of a primary key a compact cursor shows.
const MAX_KEY_CHARS: usize = 24;

/// Makes text from elsewhere safe and short enough for a terminal line:
/// control characters (C0, DEL, C1 — so no escape sequence can start),
/// bidirectional overrides and invisible format characters become spaces,
/// runs of whitespace collapse into one space, and more than `max_chars`
/// characters are cut with "…".
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)) + 4);
    let mut count = 0usize;
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() || is_unprintable(c) {
            space = !out.is_empty();
            continue;
        }
        let needed = if space { 2 } else { 1 };
        if count + needed > max_chars {
            out.push('…');
            return out;
        }
        if space {
            out.push(' ');
            count += 1;
            space = false;
        }
        out.push(c);
        count += 1;
    }
    out
}

fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// A sanitised message, or a placeholder when nothing printable is left.
fn message(text: &str) -> String {
    let s = sanitize(text, MAX_MESSAGE_CHARS);
    if s.is_empty() {
        "(no message)".to_owned()
    } else {
        s
    }
}

/// "kind: message" for an error column, "-" without an error.
fn error_text(kind: Option<&str>, text: Option<&str>) -> String {
    match (kind, text) {
        (None, None) => "-".to_owned(),
        (Some(k), None) => sanitize(k, 40),
        (None, Some(m)) => message(m),
        (Some(k), Some(m)) => format!("{}: {}", sanitize(k, 40), message(m)),
    }
}

/// A duration in seconds as people read it: "45s", "3m", "2h 5m", "3d 4h".
/// Negative durations (clocks of different machines) count as zero.
pub(crate) fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h {m}m"),
        },
        _ => match (s / 86400, s % 86400 / 3600) {
            (d, 0) => format!("{d}d"),
            (d, h) => format!("{d}d {h}h"),
        },
    }
}

/// "3m ago", or "never".
pub(crate) fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ago", human_duration((now - t).num_seconds())),
        None => "never".to_owned(),
    }
}

/// Bytes in binary units: "512 B", "1.5 KiB", "12.0 MiB".
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A cursor in a few characters: `changes@1234`, `changes@1234+[42]` inside
/// a version, `snapshot@1234` (+ key) for a full load in progress, `-` when
/// the table has none.
pub(crate) fn compact_cursor(cursor: Option<&Cursor>) -> String {
    let Some(cursor) = cursor else { return "-".to_owned() };
    let (phase, version, key) = match cursor {
        Cursor::Snapshot { version, after_key } => ("snapshot", version, after_key),
        Cursor::Changes { version, after_key } => ("changes", version, after_key),
    };
    match key {
        None => format!("{phase}@{version}"),
        Some(k) => format!("{phase}@{version}+{}", sanitize(&k.to_string(), MAX_KEY_CHARS)),
    }
}

/// Lays rows out in columns separated by `gap` spaces, each line prefixed
/// with `indent`; the last column is not padded.
fn columns(rows: &[Vec<String>], indent: &str, gap: usize) -> Vec<String> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = indent.to_owned();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 < row.len() {
                    line.push_str(&format!("{cell:<w$}", w = widths[i] + gap));
                } else {
                    line.push_str(cell);
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Key, Value, Version};

    #[test]
    fn sanitize_removes_escapes_and_newlines() {
        assert_eq!(sanitize("a\x1b[31mred\x1b[0m\r\nnext\tline\u{9b}2J", 200), "a [31mred [0m next line 2J");
        assert_eq!(sanitize("\n\n  x  \n", 200), "x");
        assert_eq!(sanitize("left\u{202E}right", 200), "left right");
    }

    #[test]
    fn sanitize_truncates_on_characters() {
        let long = "é".repeat(300);
        let s = sanitize(&long, 200);
        assert_eq!(s.chars().count(), 201);
        assert!(s.ends_with('…'));
        assert_eq!(sanitize("abc", 3), "abc");
        assert_eq!(sanitize("abcd", 3), "abc…");
    }

    #[test]
    fn durations_read_like_people_speak() {
        assert_eq!(human_duration(-5), "0s");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(180), "3m");
        assert_eq!(human_duration(2 * 3600 + 5 * 60 + 9), "2h 5m");
        assert_eq!(human_duration(7200), "2h");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600 + 59), "3d 4h");
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn cursors_are_compact() {
        assert_eq!(compact_cursor(None), "-");
        let c = Cursor::Changes { version: Version(1234), after_key: None };
        assert_eq!(compact_cursor(Some(&c)), "changes@1234");
        let c = Cursor::Changes { version: Version(1234), after_key: Some(Key(vec![Value::Int(42)])) };
        assert_eq!(compact_cursor(Some(&c)), "changes@1234+[42]");
        let c = Cursor::Snapshot { version: Version(7), after_key: Some(Key(vec![Value::Text("x".repeat(50))])) };
        let s = compact_cursor(Some(&c));
        assert!(s.starts_with("snapshot@7+[\"xxx") && s.ends_with('…'), "{s}");
    }

    #[test]
    fn columns_align() {
        let rows = vec![vec!["a".into(), "bb".into(), "c".into()], vec!["aaa".into(), "b".into(), "".into()]];
        assert_eq!(columns(&rows, "  ", 2), vec!["  a    bb  c", "  aaa  b"]);
    }
}
