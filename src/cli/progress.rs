//! Progress for long operations: a self-rewriting line on a terminal, nothing otherwise (so
//! logs and pipes stay clean) unless asked for (`--progress`): then one line a second.

use crate::units::human;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    what: String,
    start: Instant,
    last: Option<Instant>,
    enabled: bool,
    /// Rewrite one line (a terminal) or print a line each time (a log).
    tty: bool,
}

impl Progress {
    pub fn new(what: impl Into<String>) -> Progress {
        Progress::shown(what, false)
    }

    /// `new`, shown even when stderr is not a terminal if `always`.
    pub fn shown(what: impl Into<String>, always: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            what: what.into(),
            start: Instant::now(),
            last: None,
            enabled: tty || always,
            tty,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let every = Duration::from_millis(if self.tty { 200 } else { 1000 });
        if self.last.is_some_and(|t| now - t < every) && done < total {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.start).as_secs_f64().max(1e-3);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let (start, end) = if self.tty { ("\r", "   ") } else { ("", "\n") };
        eprint!(
            "{start}{}: {} / {} ({pct}%), {}/s{end}",
            self.what,
            human(done),
            human(total),
            human((done as f64 / secs) as u64)
        );
        let _ = std::io::stderr().flush();
    }

    pub fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}
