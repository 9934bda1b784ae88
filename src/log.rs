//! The one logging path. Library code never prints: it hands a line and its level to a `Log`,
//! which sends it to the process's logger (installed once by the binary, `install`) or, for an
//! embedder or a test that wants a component's lines to itself, to a sink of its own
//! (`Log::to`). Without an installed logger, lines sent to the process's logger are dropped.
//!
//! Levels: `Error` (something failed that nobody else will report: a background commit, an
//! accept), `Warn` (a request refused or failed, the client got only a code), `Info` (what the
//! server is doing: connections, management requests, start and stop), `Debug` (detail).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    /// `error`, `warn`, `info`, `debug` (what `THINLAYER_LOG` takes).
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        })
    }
}

/// Receives each line (without a trailing newline) with its level.
pub type Sink = dyn Fn(Level, &str) + Send + Sync;

static PROCESS: OnceLock<Box<Sink>> = OnceLock::new();
static PROCESS_MAX: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Makes `sink` the process's logger, passing it lines up to `max`. Only the first call
/// installs; it returns whether this one did.
pub fn install(sink: Box<Sink>, max: Level) -> bool {
    PROCESS_MAX.store(max as u8, Relaxed);
    PROCESS.set(sink).is_ok()
}

/// Where one component's lines go, with an optional prefix naming the component
/// (`nbd: …`, `control: …`). Cheap to clone.
#[derive(Clone, Default)]
pub struct Log {
    /// None: the process's logger.
    sink: Option<Arc<Sink>>,
    scope: Option<&'static str>,
}

impl Log {
    /// The process's logger.
    pub fn process() -> Log {
        Log::default()
    }

    /// Every line, at every level, to `f`.
    pub fn to(f: impl Fn(Level, &str) + Send + Sync + 'static) -> Log {
        Log {
            sink: Some(Arc::new(f)),
            scope: None,
        }
    }

    /// The same destination, each line prefixed with `"{scope}: "`.
    pub fn scoped(&self, scope: &'static str) -> Log {
        Log {
            sink: self.sink.clone(),
            scope: Some(scope),
        }
    }

    /// Whether a line at `level` would go anywhere (to skip building an expensive one).
    pub fn enabled(&self, level: Level) -> bool {
        match &self.sink {
            Some(_) => true,
            None => PROCESS.get().is_some() && level as u8 <= PROCESS_MAX.load(Relaxed),
        }
    }

    pub fn line(&self, level: Level, what: fmt::Arguments) {
        if !self.enabled(level) {
            return;
        }
        let text = match self.scope {
            Some(s) => format!("{s}: {what}"),
            None => what.to_string(),
        };
        match &self.sink {
            Some(f) => f(level, &text),
            None => {
                if let Some(f) = PROCESS.get() {
                    f(level, &text)
                }
            }
        }
    }

    pub fn error(&self, what: fmt::Arguments) {
        self.line(Level::Error, what)
    }

    pub fn warn(&self, what: fmt::Arguments) {
        self.line(Level::Warn, what)
    }

    pub fn info(&self, what: fmt::Arguments) {
        self.line(Level::Info, what)
    }

    pub fn debug(&self, what: fmt::Arguments) {
        self.line(Level::Debug, what)
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.sink, self.scope) {
            (None, s) => write!(f, "Log(process, {s:?})"),
            (Some(_), s) => write!(f, "Log(sink, {s:?})"),
        }
    }
}

/// A line to the process's logger, from library code with no `Log` of its own to hand:
/// `log::process(Level::Warn, format_args!(...))`.
pub fn process(level: Level, what: fmt::Arguments) {
    Log::process().line(level, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_sink_gets_every_level_with_the_scope_prefixed() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let log = Log::to(move |l, s| g.lock().unwrap().push((l, s.to_string()))).scoped("nbd");
        log.debug(format_args!("a {}", 1));
        log.error(format_args!("b"));
        assert_eq!(
            *got.lock().unwrap(),
            vec![
                (Level::Debug, "nbd: a 1".to_string()),
                (Level::Error, "nbd: b".to_string())
            ]
        );
    }

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Level::parse("WARN"), Some(Level::Warn));
        assert_eq!(Level::parse("debug"), Some(Level::Debug));
        assert_eq!(Level::parse("loud"), None);
        assert!(Level::Error < Level::Warn && Level::Info < Level::Debug);
    }
}
