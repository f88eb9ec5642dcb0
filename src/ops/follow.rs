//! `ctmirror status --follow`: what changes while cycles run.
//!
//! [`FollowState`] holds what the previous poll showed and turns the next
//! snapshot into [`FollowEvent`]s; [`follow`] polls the control database and
//! shows the events as progress bars (terminal) or plain lines (anything
//! else, so logs and CI output stay greppable).

use super::status::NO_PAIRS;
use super::{compact_cursor, error_text, human_bytes, sanitize};
use crate::control::{ControlDb, PairStatus};
use crate::ids::TenantId;
use crate::schedule::store::{PairKey, RunId, StoreError, TableProgress};
use chrono::{DateTime, SecondsFormat, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Polling faster than this only loads the control database.
const MIN_EVERY: Duration = Duration::from_millis(200);

/// How long a finished bar stays on screen before it is removed (its end
/// was also printed as a line above the bars).
const FINISHED_VISIBLE: Duration = Duration::from_secs(10);

const SPIN: Duration = Duration::from_millis(120);

/// One change between two polls.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEvent {
    /// A run appeared (or was already running at the first poll).
    Started { pair: PairKey, run: RunId, owner: String },
    /// A table of a running run reported progress different from the last poll.
    Progress { pair: PairKey, run: RunId, table: TableProgress },
    /// A run is no longer running. `outcome` is the pair's last outcome when
    /// it belongs to this run.
    Ended {
        pair: PairKey,
        run: RunId,
        outcome: String,
        error: Option<String>,
        /// Its tables' last progress seen.
        tables: Vec<TableProgress>,
    },
}

impl FollowEvent {
    pub fn pair(&self) -> &PairKey {
        match self {
            FollowEvent::Started { pair, .. } | FollowEvent::Progress { pair, .. } | FollowEvent::Ended { pair, .. } => {
                pair
            }
        }
    }

    /// The event as one plain line, stamped with `now`; everything from
    /// elsewhere in it is sanitised.
    pub fn line(&self, now: DateTime<Utc>) -> String {
        let time = now.to_rfc3339_opts(SecondsFormat::Secs, true);
        match self {
            FollowEvent::Started { pair, run, owner } => {
                format!("{time} {pair} started run {run} on {}", sanitize(owner, 80))
            }
            FollowEvent::Progress { pair, table: t, .. } => format!(
                "{time} {pair} {} {} rows={} batches={} bytes={} cursor={}",
                sanitize(&t.table, 80),
                sanitize(&t.mode, 20),
                t.rows,
                t.batches,
                t.bytes,
                compact_cursor(t.cursor.as_ref())
            ),
            FollowEvent::Ended { pair, outcome, error, .. } => match error {
                Some(e) => format!("{time} {pair} ended: {outcome}, error {e}"),
                None => format!("{time} {pair} ended: {outcome}"),
            },
        }
    }
}

/// A run seen running at the last poll.
#[derive(Debug, Clone)]
struct Seen {
    run: RunId,
    started: DateTime<Utc>,
    tables: BTreeMap<String, TableProgress>,
}

/// What the last poll showed, to report only what changed since.
#[derive(Debug, Default)]
pub struct FollowState {
    running: BTreeMap<PairKey, Seen>,
}

impl FollowState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The runs seen running at the last poll.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The changes from the last poll to `statuses`, pair by pair: an end
    /// before a start (a pair can finish one run and start the next between
    /// two polls), then the tables whose progress changed.
    pub fn events(&mut self, statuses: &[PairStatus]) -> Vec<FollowEvent> {
        let mut events = Vec::new();
        let mut listed = std::collections::BTreeSet::new();
        for p in statuses {
            listed.insert(&p.key);
            let now_running = p.running.as_ref();
            let over = self.running.get(&p.key).is_some_and(|seen| now_running.is_none_or(|r| r.id != seen.run));
            if let Some(seen) = over.then(|| self.running.remove(&p.key)).flatten() {
                events.push(ended(p.key.clone(), seen, Some(p)));
            }
            let Some(run) = now_running else { continue };
            let seen = self.running.entry(p.key.clone()).or_insert_with(|| {
                events.push(FollowEvent::Started { pair: p.key.clone(), run: run.id, owner: run.owner.clone() });
                Seen { run: run.id, started: run.started, tables: BTreeMap::new() }
            });
            for t in &run.progress {
                if seen.tables.get(&t.table) != Some(t) {
                    seen.tables.insert(t.table.clone(), t.clone());
                    events.push(FollowEvent::Progress { pair: p.key.clone(), run: run.id, table: t.clone() });
                }
            }
        }
        let gone: Vec<PairKey> = self.running.keys().filter(|k| !listed.contains(k)).cloned().collect();
        for key in gone {
            if let Some(seen) = self.running.remove(&key) {
                events.push(ended(key, seen, None));
            }
        }
        events
    }

    /// [`Self::events`] as plain lines stamped with `now`.
    pub fn update(&mut self, statuses: &[PairStatus], now: DateTime<Utc>) -> Vec<String> {
        self.events(statuses).iter().map(|e| e.line(now)).collect()
    }
}

fn ended(pair: PairKey, seen: Seen, status: Option<&PairStatus>) -> FollowEvent {
    let (outcome, error) = match status {
        None => ("no longer listed".to_owned(), None),
        // The pair's last outcome is this run's only if it ended after the
        // run started; otherwise the run ended without recording one (its
        // lease was taken over, say).
        Some(p) => match p.last_outcome {
            Some(o) if p.last_end.is_some_and(|e| e >= seen.started) => {
                let error = match (&p.last_error_kind, &p.last_error) {
                    (None, None) => None,
                    (Some(k), m) => Some(format!("({}): {}", sanitize(k, 40), error_text(None, m.as_deref()))),
                    (None, Some(m)) => Some(error_text(None, Some(m))),
                };
                (o.as_str().to_owned(), error)
            }
            _ => ("outcome not recorded for the pair (see its run history)".to_owned(), None),
        },
    };
    FollowEvent::Ended { pair, run: seen.run, outcome, error, tables: seen.tables.into_values().collect() }
}

/// Polls every `every` and shows what changes, until the caller stops it
/// (it races this with Ctrl-C / SIGTERM). Transient control-database errors
/// are shown and polling goes on; other errors end it. Stops quietly when
/// stdout is closed.
pub async fn follow(control: &ControlDb, tenant: Option<&TenantId>, every: Duration) -> Result<(), StoreError> {
    let every = every.max(MIN_EVERY);
    let mut out = if std::io::stdout().is_terminal() { Output::bars() } else { Output::Plain };
    let mut state = FollowState::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let mut unreachable = false;
    loop {
        ticker.tick().await;
        let statuses = match control.status(tenant).await {
            Ok(s) => s,
            Err(e) if e.is_retryable() => {
                if !unreachable && !out.say(&format!("{} {} (retrying)", stamp(Utc::now()), message_of(&e))) {
                    return Ok(());
                }
                unreachable = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        let now = Utc::now();
        if unreachable {
            unreachable = false;
            if !out.say(&format!("{} control database reachable again", stamp(now))) {
                return Ok(());
            }
        }
        let events = state.events(&statuses);
        if first {
            first = false;
            let intro = if statuses.is_empty() {
                format!("{} {NO_PAIRS}", stamp(now))
            } else {
                format!(
                    "{} following {} pairs ({} running), every {}",
                    stamp(now),
                    statuses.len(),
                    state.running(),
                    if every < Duration::from_secs(1) {
                        format!("{}ms", every.as_millis())
                    } else {
                        super::human_duration(i64::try_from(every.as_secs()).unwrap_or(i64::MAX))
                    }
                )
            };
            if !out.say(&intro) {
                return Ok(());
            }
        }
        if !out.show(&events, statuses.len(), state.running(), now) {
            return Ok(());
        }
    }
}

fn stamp(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn message_of(e: &StoreError) -> String {
    sanitize(&e.to_string(), super::MAX_MESSAGE_CHARS)
}

enum Output {
    Plain,
    Bars(Bars),
}

struct Bars {
    multi: MultiProgress,
    /// Pairs, runs and the last poll, so an idle screen is visibly alive.
    top: ProgressBar,
    live: HashMap<(PairKey, String), ProgressBar>,
    finished: Vec<(ProgressBar, Instant)>,
}

fn spinner_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Output {
    fn bars() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let top = ProgressBar::new_spinner().with_style(spinner_style("{spinner:.green} {msg}"));
        let top = multi.add(top.with_message("polling…"));
        top.enable_steady_tick(SPIN);
        Output::Bars(Bars { multi, top, live: HashMap::new(), finished: Vec::new() })
    }

    /// One line of its own; false when stdout is gone.
    fn say(&mut self, line: &str) -> bool {
        match self {
            Output::Plain => {
                let mut o = std::io::stdout().lock();
                writeln!(o, "{line}").and_then(|()| o.flush()).is_ok()
            }
            Output::Bars(b) => {
                let _ = b.multi.println(line);
                true
            }
        }
    }

    /// One poll's events; false when stdout is gone.
    fn show(&mut self, events: &[FollowEvent], pairs: usize, running: usize, now: DateTime<Utc>) -> bool {
        match self {
            Output::Plain => {
                let mut o = std::io::stdout().lock();
                events.iter().try_for_each(|e| writeln!(o, "{}", e.line(now))).and_then(|()| o.flush()).is_ok()
            }
            Output::Bars(b) => {
                b.show(events, pairs, running, now);
                true
            }
        }
    }
}

impl Bars {
    fn show(&mut self, events: &[FollowEvent], pairs: usize, running: usize, now: DateTime<Utc>) {
        let due = Instant::now();
        self.finished.retain(|(bar, at)| {
            let keep = due.duration_since(*at) < FINISHED_VISIBLE;
            if !keep {
                self.multi.remove(bar);
            }
            keep
        });
        for e in events {
            match e {
                FollowEvent::Started { .. } => {
                    let _ = self.multi.println(e.line(now));
                }
                FollowEvent::Progress { pair, table: t, .. } => {
                    let bar = self.live.entry((pair.clone(), t.table.clone())).or_insert_with(|| {
                        let bar = self.multi.add(
                            ProgressBar::new_spinner()
                                .with_style(spinner_style("{spinner:.green} {prefix:.bold} {msg}"))
                                .with_prefix(format!("{pair} {}", sanitize(&t.table, 60))),
                        );
                        bar.enable_steady_tick(SPIN);
                        bar
                    });
                    bar.set_message(format!(
                        "{}  rows {}  batches {}  {}  cursor {}",
                        sanitize(&t.mode, 20),
                        t.rows,
                        t.batches,
                        human_bytes(t.bytes),
                        compact_cursor(t.cursor.as_ref())
                    ));
                }
                FollowEvent::Ended { pair, outcome, tables, .. } => {
                    for t in tables {
                        if let Some(bar) = self.live.remove(&(pair.clone(), t.table.clone())) {
                            bar.finish_with_message(format!("done: {outcome}, {} rows", t.rows));
                            self.finished.push((bar, due));
                        }
                    }
                    let _ = self.multi.println(e.line(now));
                }
            }
        }
        self.top.set_message(format!(
            "{pairs} pairs, {running} running; polled {}; Ctrl-C to stop",
            now.with_timezone(&chrono::Local).format("%H:%M:%S")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::status::tests::{changes, idle, now, prog, running, secs_ago};
    use super::*;
    use crate::schedule::store::Outcome;
    use chrono::TimeDelta;

    const T: &str = "2024-05-01T12:00:00Z";

    #[test]
    fn run_appears_progresses_and_ends() {
        let mut state = FollowState::new();
        let idle_pair = idle("acme", "crm");
        assert!(state.update(&[idle_pair.clone(), idle("acme", "erp")], now()).is_empty());

        let p = running(idle_pair.clone(), 42, vec![prog("contact", 10, changes(1234))]);
        assert_eq!(
            state.update(&[p.clone(), idle("acme", "erp")], now()),
            [
                format!("{T} acme/crm started run 42 on host-123"),
                format!("{T} acme/crm contact full rows=10 batches=1 bytes=1000 cursor=changes@1234"),
            ]
        );

        let p = running(idle_pair.clone(), 42, vec![prog("contact", 2500, changes(1240)), prog("deal", 0, None)]);
        assert_eq!(
            state.update(std::slice::from_ref(&p), now()),
            [
                format!("{T} acme/crm contact full rows=2500 batches=3 bytes=250000 cursor=changes@1240"),
                format!("{T} acme/crm deal full rows=0 batches=1 bytes=0 cursor=-"),
            ]
        );

        // Nothing changed: nothing printed.
        assert!(state.update(&[p], now()).is_empty());
        assert_eq!(state.running(), 1);

        let mut done = idle_pair.clone();
        done.last_start = Some(secs_ago(12));
        done.last_end = Some(now());
        assert_eq!(state.update(&[done], now()), [format!("{T} acme/crm ended: succeeded")]);
        assert_eq!(state.running(), 0);
    }

    #[test]
    fn failed_end_carries_sanitised_error_and_last_rows() {
        let mut state = FollowState::new();
        let p = running(idle("acme", "crm"), 7, vec![prog("contact", 1234, changes(5))]);
        state.events(&[p]);
        let mut failed = idle("acme", "crm");
        failed.last_outcome = Some(Outcome::Failed);
        failed.last_end = Some(now());
        failed.last_error_kind = Some("transient".into());
        failed.last_error = Some("receiver answered 503\n\x1b[31mboom\x1b[0m".into());
        let events = state.events(&[failed]);
        assert_eq!(events.len(), 1);
        let FollowEvent::Ended { tables, .. } = &events[0] else { panic!("{events:?}") };
        assert_eq!(tables[0].rows, 1234);
        assert_eq!(
            events[0].line(now()),
            format!("{T} acme/crm ended: failed, error (transient): receiver answered 503 [31mboom [0m")
        );
    }

    #[test]
    fn next_run_between_polls_ends_then_starts() {
        let mut state = FollowState::new();
        state.events(&[running(idle("acme", "crm"), 1, vec![])]);
        // Run 1 ended (after it started: the outcome is its own) and run 2
        // started before the next poll.
        let mut p = running(idle("acme", "crm"), 2, vec![]);
        p.last_end = Some(secs_ago(5));
        p.running.as_mut().unwrap().started = secs_ago(3);
        p.running.as_mut().unwrap().owner = "host-9\x1b[2J".into();
        assert_eq!(
            state.update(&[p], now()),
            [format!("{T} acme/crm ended: succeeded"), format!("{T} acme/crm started run 2 on host-9 [2J")]
        );
    }

    #[test]
    fn end_without_recorded_outcome_or_pair_says_so() {
        let mut state = FollowState::new();
        state.events(&[running(idle("acme", "crm"), 1, vec![]), running(idle("acme", "erp"), 2, vec![])]);
        // crm's record is older than the run (its lease was taken over);
        // erp vanished from the list.
        let mut crm = idle("acme", "crm");
        crm.last_end = Some(secs_ago(60));
        assert_eq!(
            state.update(&[crm], now() + TimeDelta::seconds(1)),
            [
                "2024-05-01T12:00:01Z acme/crm ended: outcome not recorded for the pair (see its run history)",
                "2024-05-01T12:00:01Z acme/erp ended: no longer listed",
            ]
        );
    }
}
