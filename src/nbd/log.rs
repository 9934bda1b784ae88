//! Where the server's log lines go: stderr unless the embedder (a test, a daemon with its own
//! logger) says otherwise.

use std::fmt;
use std::sync::Arc;

#[derive(Clone)]
pub struct LogSink(Arc<dyn Fn(&str) + Send + Sync>);

impl LogSink {
    pub fn stderr() -> LogSink {
        LogSink::new(|line| eprintln!("{line}"))
    }

    /// Sends each line, already prefixed with "nbd: ", to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> LogSink {
        LogSink(Arc::new(f))
    }

    pub fn line(&self, what: fmt::Arguments) {
        (self.0)(&format!("nbd: {what}"));
    }
}

impl Default for LogSink {
    fn default() -> Self {
        LogSink::stderr()
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogSink")
    }
}
