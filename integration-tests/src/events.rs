//! The server's log, seen as lifecycle events: the capture of its stderr ([`Log`], one
//! reader thread, a `Condvar` for waiters, no polling), the parse of one tracing `fmt`
//! line into an [`Event`] (its `event` name and typed fields), and the answers tests
//! draw from the events ([`fewest_ready_workers`], the current worker of each slot).
//!
//! Tests wait on the stable `event` field, never on the prose of a lifecycle line: a
//! reworded message breaks nothing. Raw lines stay available ([`Log::wait_line`]) for
//! what is not a coreloop lifecycle event: the demo's and fixtures' own lines, and the
//! error sentences a user must see.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::str::FromStr;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};

use crate::process::open_pidfd;

// ---------------------------------------------------------------------------------------
// One line, parsed
// ---------------------------------------------------------------------------------------

/// A tracing `fmt` line that carries an `event` field: a lifecycle event of the
/// supervisor or of a worker, e.g.
/// `… INFO supervisor{pid=9}:watch{worker.id=0 worker.pid=12}: coreloop::supervisor:
/// worker ready event="worker_ready" worker.id=0 worker.pid=12`.
///
/// Fields are looked up by key, the event's own first, then its spans' from the
/// innermost out (a worker's `draining` names its pid only in the `worker{…}` span).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    line: String,
    name: String,
    level: String,
    spans: Vec<(String, Vec<(String, String)>)>,
    fields: Vec<(String, String)>,
}

impl Event {
    /// Parses `line`; `None` if it is not a tracing line with an `event` field.
    pub fn parse(line: &str) -> Option<Self> {
        let mut rest = line.trim_start();
        // An optional timestamp, then the level.
        let mut level = None;
        for _ in 0..2 {
            let (token, after) = rest.split_once(' ')?;
            rest = after.trim_start();
            if matches!(token, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR") {
                level = Some(token);
                break;
            }
        }
        let level = level?;
        // `span{fields}:span{fields}: target: ` or `target: `.
        let (head, after) = split_colon_space(rest)?;
        let (spans, body) = if head.contains('{') {
            let (_target, body) = split_colon_space(after)?;
            (parse_spans(head), body)
        } else {
            (Vec::new(), after)
        };
        let fields = parse_fields(body);
        let name = fields
            .iter()
            .rev()
            .find(|(key, _)| key == "event")
            .map(|(_, value)| unquote(value).to_owned())?;
        Some(Self {
            line: line.to_owned(),
            name,
            level: level.to_owned(),
            spans,
            fields,
        })
    }

    /// The event's name (its `event` field), e.g. `worker_ready`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is event `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name == name
    }

    /// The level: `TRACE`, `DEBUG`, `INFO`, `WARN` or `ERROR`.
    pub fn level(&self) -> &str {
        &self.level
    }

    /// The whole log line.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// The value of field `key` as written, without the quotes of a string value (escapes
    /// are kept): the event's own field, else the innermost span's that has it.
    pub fn field(&self, key: &str) -> Option<&str> {
        let own = self.fields.iter().rev().find(|(k, _)| k == key);
        let spans = self
            .spans
            .iter()
            .rev()
            .find_map(|(_, fields)| fields.iter().find(|(k, _)| k == key));
        own.or(spans).map(|(_, value)| unquote(value))
    }

    /// Field `key` parsed as a `T` (a number, mostly); `None` if absent or unparsable.
    pub fn parsed<T: FromStr>(&self, key: &str) -> Option<T> {
        self.field(key)?.parse().ok()
    }

    /// The `worker.id` field: the slot.
    pub fn worker_id(&self) -> Option<usize> {
        self.parsed("worker.id")
    }

    /// The `worker.pid` field.
    pub fn worker_pid(&self) -> Option<u32> {
        self.parsed("worker.pid")
    }

    /// The `reason` field (`worker_exited`, `worker_killed`): `crash`, `drained`, …
    pub fn reason(&self) -> Option<&str> {
        self.field("reason")
    }

    /// Whether this is a `worker_exited` at the end of a drain the supervisor asked for
    /// (`reason` drained, reload, recycle, retire or scale-down; its message says
    /// `worker exited after draining`), not a death.
    pub fn ends_a_drain(&self) -> bool {
        self.is("worker_exited") && self.reason().is_some_and(|r| DRAIN_REASONS.contains(&r))
    }

    /// Whether this is a `worker_exited` of a worker that died: a `reason` that does not
    /// end a drain (crash, hang, start-failure, …; its message says `worker died`).
    pub fn is_death(&self) -> bool {
        self.is("worker_exited") && self.reason().is_some_and(|r| !DRAIN_REASONS.contains(&r))
    }

    /// The PID of the supervisor that logged it, from its `supervisor{pid=…}` span.
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.span_field("supervisor", "pid")?.parse().ok()
    }

    /// Field `key` of the span named `span`, without quotes.
    pub fn span_field(&self, span: &str, key: &str) -> Option<&str> {
        self.spans
            .iter()
            .filter(|(name, _)| name == span)
            .find_map(|(_, fields)| fields.iter().find(|(k, _)| k == key))
            .map(|(_, value)| unquote(value))
    }
}

/// The `reason`s of a `worker_exited` that ends a drain the supervisor asked for.
pub const DRAIN_REASONS: &[&str] = &["drained", "reload", "recycle", "retire", "scale-down"];

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// Splits at the first `": "` outside braces and quotes.
fn split_colon_space(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for (index, &byte) in bytes.iter().enumerate() {
        if quoted {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => quoted = true,
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            b':' if depth == 0 && bytes.get(index + 1) == Some(&b' ') => {
                return Some((&text[..index], &text[index + 2..]));
            }
            _ => {}
        }
    }
    None
}

/// `supervisor{pid=9}:watch{worker.id=0 worker.pid=12}`, outermost first.
fn parse_spans(head: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut spans = Vec::new();
    let mut rest = head;
    while let Some(open) = rest.find('{') {
        let name = rest[..open].trim_start_matches(':').to_owned();
        let inner = &rest[open + 1..];
        let close = matching_brace(inner).unwrap_or(inner.len());
        let fields = parse_fields(&inner[..close])
            .into_iter()
            .collect::<Vec<_>>();
        spans.push((name, fields));
        rest = inner.get(close + 1..).unwrap_or("");
    }
    spans
}

/// Index of the `}` that closes a brace opened just before `text`.
fn matching_brace(text: &str) -> Option<usize> {
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for (index, byte) in text.bytes().enumerate() {
        if quoted {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => quoted = true,
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some(index),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Whether a field `key=` starts at `index` of `text` (at its start or after a space).
fn key_at(text: &str, index: usize) -> Option<&str> {
    if index > 0 && text.as_bytes()[index - 1] != b' ' {
        return None;
    }
    let rest = &text[index..];
    let end = rest.find('=')?;
    let key = &rest[..end];
    let mut chars = key.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() || first == '_')
        .then_some(())
        .filter(|()| chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.')))
        .map(|()| key)
}

/// The `key=value` pairs of `message key=value key="value" …`. A quoted value runs to its
/// closing quote; any other value runs to the next ` key=` (Display values may hold
/// spaces: `status=exit code 0`).
fn parse_fields(text: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut index = 0;
    // The message: everything before the first key.
    while index < text.len() && key_at(text, index).is_none() {
        index += text[index..].chars().next().map_or(1, char::len_utf8);
    }
    while index < text.len() {
        let Some(key) = key_at(text, index) else {
            break;
        };
        let start = index + key.len() + 1;
        let value_end = if text[start..].starts_with('"') {
            let mut escaped = false;
            text[start + 1..]
                .char_indices()
                .find(|&(_, c)| match c {
                    _ if escaped => {
                        escaped = false;
                        false
                    }
                    '\\' => {
                        escaped = true;
                        false
                    }
                    c => c == '"',
                })
                .map_or(text.len(), |(at, _)| start + 1 + at + 1)
        } else {
            let mut end = start;
            loop {
                match text[end..].find(' ') {
                    None => break text.len(),
                    Some(space) => {
                        end += space + 1;
                        if key_at(text, end).is_some() {
                            break end - 1;
                        }
                    }
                }
            }
        };
        fields.push((key.to_owned(), text[start..value_end].to_owned()));
        // Past the value and the space after it.
        index = value_end;
        while text[index..].starts_with(' ') {
            index += 1;
        }
    }
    fields
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// The value of field `key` in a tracing `fmt` line: the last `key=value` whose key starts
/// at a word boundary (event fields come after the span fields), up to whitespace or `}`.
/// Quotes are kept (`signal="SIGTERM"`). Prefer [`Event::field`] for lifecycle lines.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=");
    line.rmatch_indices(&pattern)
        .find(|(index, _)| *index == 0 || matches!(line.as_bytes()[index - 1], b' ' | b'{'))
        .map(|(index, _)| {
            let rest = &line[index + pattern.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '}')
                .unwrap_or(rest.len());
            &rest[..end]
        })
}

/// Whether `line` is the lifecycle event `name` (its `event` field).
pub fn is_event(line: &str, name: &str) -> bool {
    Event::parse(line).is_some_and(|event| event.is(name))
}

/// A supervisor's `worker_ready` event, as `(worker.id, worker.pid)`.
pub fn parse_worker_ready(line: &str) -> Option<(usize, u32)> {
    let event = Event::parse(line).filter(|event| event.is("worker_ready"))?;
    Some((event.worker_id()?, event.worker_pid()?))
}

/// The fewest workers ready to take connections at any point of `lines` from the
/// supervisor's `serving` event on, as the events tell it, and the line where that
/// minimum was first reached; `None` if there is no `serving` event.
///
/// A worker counts from its `worker_ready` until it is drained (named as `old.pid` by
/// `replacement_ready`, or its own `draining`) or exits (`worker_exited`).
pub fn fewest_ready_workers(lines: &[String]) -> Option<(usize, String)> {
    let mut ready = BTreeSet::new();
    let mut fewest: Option<(usize, String)> = None;
    let mut serving = false;
    for line in lines {
        if let Some(event) = Event::parse(line) {
            match event.name() {
                "worker_ready" => {
                    ready.extend(event.worker_pid());
                }
                "replacement_ready" => {
                    if let Some(pid) = event.parsed::<u32>("old.pid") {
                        ready.remove(&pid);
                    }
                }
                "draining" | "worker_exited" => {
                    if let Some(pid) = event.worker_pid() {
                        ready.remove(&pid);
                    }
                }
                "serving" => serving = true,
                _ => {}
            }
        }
        if serving && fewest.as_ref().is_none_or(|(n, _)| ready.len() < *n) {
            fewest = Some((ready.len(), line.clone()));
        }
    }
    fewest
}

/// Asserts that at least `min` workers were ready to take connections at every point of
/// `lines` from the `serving` event on (see [`fewest_ready_workers`]).
///
/// # Errors
///
/// No `serving` event in `lines`.
///
/// # Panics
///
/// When fewer were ready at some point (the message names the line).
pub fn assert_min_ready_workers(lines: &[String], min: usize) -> Result<()> {
    let (fewest, at) = fewest_ready_workers(lines).context("no `serving` event")?;
    assert!(
        fewest >= min,
        "only {fewest} ready worker(s) at log line {at:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The capture
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// The stderr pipe reached EOF: the supervisor and every worker closed it.
    closed: bool,
    /// Every worker PID seen in a `worker_spawned` or `worker_ready` event, with a pidfd
    /// opened as soon as the line was read, so the process can be killed later without
    /// any risk of hitting a recycled PID.
    workers: BTreeMap<u32, Option<OwnedFd>>,
}

/// A server's stderr, line by line, as it arrives (a reader thread fills it, see
/// [`Log::capture`]). Lines are numbered from 0: a *mark* ([`Log::mark`]) is the number
/// of lines so far, and the waits look from a mark on.
#[derive(Debug, Default)]
pub struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `stderr` to its end, echoing each line to the test's stderr after `label`,
    /// and records it (and the pidfd of each worker its events name). Run it on a thread
    /// of its own.
    pub fn capture(&self, stderr: impl Read, label: &str) {
        let mut reader = BufReader::new(stderr);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            eprintln!("[{label}] {line}");
            let worker = Event::parse(&line)
                .filter(|event| event.is("worker_spawned") || event.is("worker_ready"))
                .and_then(|event| event.worker_pid());
            let mut state = self.lock();
            if let Some(pid) = worker {
                state.workers.entry(pid).or_insert_with(|| open_pidfd(pid));
            }
            state.lines.push(line);
            drop(state);
            self.changed.notify_all();
        }
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Number of lines so far: a mark for the waits.
    pub fn mark(&self) -> usize {
        self.lock().lines.len()
    }

    /// The lines from index `mark` on.
    pub fn lines_since(&self, mark: usize) -> Vec<String> {
        self.lock().lines.iter().skip(mark).cloned().collect()
    }

    /// The events from line `mark` on.
    pub fn events_since(&self, mark: usize) -> Vec<Event> {
        self.lock()
            .lines
            .iter()
            .skip(mark)
            .filter_map(|line| Event::parse(line))
            .collect()
    }

    /// The log so far as one string.
    pub fn text(&self) -> String {
        self.lock().lines.join("\n")
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let state = self.lock();
        state.lines[state.lines.len().saturating_sub(n)..].join("\n")
    }

    /// Blocks until `n` lines from `mark` on satisfy `pred`, and returns the first `n`
    /// or more; `None` after `timeout`, or once stderr is closed with fewer.
    pub fn wait_lines(
        &self,
        mark: usize,
        n: usize,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut found = Vec::new();
        let mut next = mark;
        let mut state = self.lock();
        loop {
            for line in state.lines.iter().skip(next) {
                if pred(line) {
                    found.push(line.clone());
                }
            }
            next = state.lines.len().max(mark);
            if found.len() >= n {
                return Some(found);
            }
            if state.closed {
                return None;
            }
            let remaining = deadline.checked_duration_since(Instant::now())?;
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks until some line from `mark` on satisfies `pred`, and returns it; `None`
    /// after `timeout`, or once stderr is closed without a match.
    pub fn wait_line(
        &self,
        mark: usize,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.wait_lines(mark, 1, pred, timeout)
            .and_then(|lines| lines.into_iter().next())
    }

    /// Blocks until `n` events `name` from line `mark` on satisfy `pred`; returns them,
    /// or `None` after `timeout` (or once stderr is closed with fewer).
    pub fn wait_events(
        &self,
        mark: usize,
        name: &str,
        n: usize,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Vec<Event>> {
        let lines = self.wait_lines(
            mark,
            n,
            |line| Event::parse(line).is_some_and(|event| event.is(name) && pred(&event)),
            timeout,
        )?;
        Some(lines.iter().filter_map(|line| Event::parse(line)).collect())
    }

    /// Blocks until an event `name` from line `mark` on satisfies `pred`, and returns
    /// it; `None` after `timeout` (or once stderr is closed without one).
    pub fn wait_event(
        &self,
        mark: usize,
        name: &str,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        self.wait_events(mark, name, 1, pred, timeout)
            .and_then(|events| events.into_iter().next())
    }

    /// Like [`wait_event`](Self::wait_event), with an error naming `name` and showing the
    /// end of the log when none came.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`.
    pub fn expect_event(
        &self,
        mark: usize,
        name: &str,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        self.wait_event(mark, name, pred, timeout)
            .ok_or_else(|| self.missing(&format!("matching `{name}` event"), timeout))
    }

    /// The error of a wait for `what` that gave up after `timeout`.
    pub fn missing(&self, what: &str, timeout: Duration) -> anyhow::Error {
        let tail = self.tail(40);
        anyhow!("no {what} in the log within {timeout:?}; its last lines:\n{tail}")
    }

    /// Whether stderr has been closed by every process holding it, waiting up to
    /// `timeout` for that.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.closed {
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// The current worker of each slot: `worker.id -> worker.pid` from the latest
    /// `worker_ready` event of each id.
    pub fn worker_pids(&self) -> BTreeMap<usize, u32> {
        self.lock()
            .lines
            .iter()
            .filter_map(|line| parse_worker_ready(line))
            .collect()
    }

    /// Every worker PID the events named so far (spawned or ready).
    pub fn all_worker_pids(&self) -> BTreeSet<u32> {
        self.lock().workers.keys().copied().collect()
    }

    /// Takes the pidfds of every worker seen (for killing them), leaving none.
    pub fn take_workers(&self) -> Vec<(u32, OwnedFd)> {
        std::mem::take(&mut self.lock().workers)
            .into_iter()
            .filter_map(|(pid, fd)| fd.map(|fd| (pid, fd)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Event;

    #[test]
    fn parses_spans_fields_and_spaced_values() {
        let line = "2024-01-01T00:00:00.000000Z  WARN supervisor{pid=9}:watch{worker.id=0 \
                    worker.pid=12}: coreloop::supervisor: worker died event=\"worker_exited\" \
                    worker.id=0 worker.pid=12 reason=\"crash\" status=killed by signal 9 \
                    uptime_ms=5 failure=\"\"";
        let event = Event::parse(line).expect("an event");
        assert_eq!(event.name(), "worker_exited");
        assert_eq!(event.level(), "WARN");
        assert_eq!(event.worker_id(), Some(0));
        assert_eq!(event.worker_pid(), Some(12));
        assert_eq!(event.reason(), Some("crash"));
        assert_eq!(event.field("status"), Some("killed by signal 9"));
        assert_eq!(event.parsed::<u64>("uptime_ms"), Some(5));
        assert_eq!(event.field("failure"), Some(""));
        assert_eq!(event.supervisor_pid(), Some(9));
    }

    #[test]
    fn worker_fields_come_from_its_span() {
        let line = "2024-01-01T00:00:00Z  INFO worker{worker.id=1 worker.pid=33}: \
                    coreloop::worker: draining live=2 timeout=30s event=\"draining\"";
        let event = Event::parse(line).expect("an event");
        assert!(event.is("draining"));
        assert_eq!(event.worker_pid(), Some(33));
        assert_eq!(event.parsed::<usize>("live"), Some(2));
        assert_eq!(event.field("timeout"), Some("30s"));
    }

    #[test]
    fn debug_values_and_lines_without_spans() {
        let line = "2024-01-01T00:00:00Z  INFO coreloop::supervisor: serving workers=2 \
                    listeners=[\"127.0.0.1:1\", \"unix:/tmp/x\"] upgraded=false event=\"serving\"";
        let event = Event::parse(line).expect("an event");
        assert!(event.is("serving"));
        assert_eq!(
            event.field("listeners"),
            Some("[\"127.0.0.1:1\", \"unix:/tmp/x\"]")
        );
        assert_eq!(event.field("upgraded"), Some("false"));
        let command = "2024-01-01T00:00:00Z  INFO supervisor{pid=4}: coreloop::supervisor: \
                       command from the server handle command=Stop { graceful: true } \
                       event=\"command\"";
        let event = Event::parse(command).expect("an event");
        assert_eq!(event.field("command"), Some("Stop { graceful: true }"));
        assert!(Event::parse("Error: cannot listen on 127.0.0.1:1").is_none());
        assert!(Event::parse("2024  INFO fixture: holding connection").is_none());
    }
}
