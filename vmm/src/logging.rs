//! The VMM's log output: `tracing` events, one line each, on stderr.
//!
//! `tracing_subscriber::fmt` keeps a span registry whose slab allocates and
//! zeroes 32 KiB at start-up. The VMM records no spans, and that heap page
//! set would be paid once per idle guest, so events go through this small
//! subscriber instead; `tracing_subscriber::filter::Targets` still parses
//! the filter (`warn`, `vmm=debug,info`, ...).

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter is not `level` or `target=level,...`.
    #[error("invalid log filter {0:?}")]
    Filter(String, #[source] tracing_subscriber::filter::ParseError),
    /// Another subscriber was installed first.
    #[error("a log subscriber is already installed")]
    AlreadySet,
}

/// Writes every enabled event as `TIME LEVEL message key=value...` to stderr.
#[derive(Debug)]
pub struct StderrLog {
    filter: Targets,
    max: LevelFilter,
}

impl StderrLog {
    /// A subscriber for `filter` (`warn`, `vmm=debug,info`, ...).
    pub fn new(filter: &str) -> Result<Self, Error> {
        let filter: Targets = filter
            .parse()
            .map_err(|e| Error::Filter(filter.to_owned(), e))?;
        let max = filter
            .iter()
            .map(|(_, level)| level)
            .chain(filter.default_level())
            .max()
            .unwrap_or(LevelFilter::OFF);
        Ok(Self { filter, max })
    }

    /// Installs this subscriber for the whole process.
    pub fn install(self) -> Result<(), Error> {
        tracing::subscriber::set_global_default(self).map_err(|_| Error::AlreadySet)
    }

    /// Formats one event as a line (with its newline).
    fn format(&self, event: &Event<'_>) -> String {
        let mut line = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = SystemTime.format_time(&mut Writer::new(&mut line));
        let _ = write!(line, " {:>5} ", event.metadata().level());
        let mut fields = Fields {
            line: &mut line,
            first: true,
        };
        event.record(&mut fields);
        line.push('\n');
        line
    }
}

/// Appends an event's fields: the message bare, the others as `key=value`.
struct Fields<'a> {
    line: &'a mut String,
    first: bool,
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.first {
            self.line.push(' ');
        }
        self.first = false;
        let _ = if field.name() == "message" {
            write!(self.line, "{value:?}")
        } else {
            write!(self.line, "{}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl Subscriber for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter
            .would_enable(metadata.target(), metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Spans are not recorded; every span shares one id.
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let line = self.format(event);
        // One write per line so that lines from vCPU threads do not mix;
        // a closed stderr loses the log, never the guest.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    /// Whether `level` passes `filter` for the `vmm` target (for tests).
    fn passes(filter: &str, target: &str, level: Level) -> bool {
        StderrLog::new(filter)
            .expect("valid filter")
            .filter
            .would_enable(target, &level)
    }

    #[test]
    fn filters_by_level_and_target() {
        assert!(passes("warn", "vmm", Level::WARN));
        assert!(!passes("warn", "vmm", Level::INFO));
        assert!(passes("vmm=debug,warn", "vmm::runtime", Level::DEBUG));
        assert!(!passes("vmm=debug,warn", "smoltcp", Level::DEBUG));
        assert_eq!(
            StderrLog::new("info").expect("valid").max,
            LevelFilter::INFO
        );
        assert_eq!(
            StderrLog::new("vmm=trace,warn").expect("valid").max,
            LevelFilter::TRACE
        );
        assert!(matches!(StderrLog::new("vmm=loud"), Err(Error::Filter(..))));
    }

    #[test]
    fn formats_message_and_fields() {
        let log = StderrLog::new("trace").expect("valid");
        let captured = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = Capture {
            log,
            out: captured.clone(),
        };
        tracing::subscriber::with_default(sink, || {
            tracing::info!(pages = 3, "prefetched {}", "ws");
        });
        let out = captured.lock().expect("not poisoned").clone();
        assert!(out.ends_with(" INFO prefetched ws pages=3\n"), "{out:?}");
        assert!(out.starts_with("20"), "starts with a timestamp: {out:?}");
    }

    /// The real formatter, writing to a string instead of stderr.
    struct Capture {
        log: StderrLog,
        out: std::sync::Arc<std::sync::Mutex<String>>,
    }

    impl Subscriber for Capture {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            self.log.enabled(m)
        }
        fn new_span(&self, a: &Attributes<'_>) -> Id {
            self.log.new_span(a)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let line = self.log.format(e);
            self.out.lock().expect("not poisoned").push_str(&line);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}
