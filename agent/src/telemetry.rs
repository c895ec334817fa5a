//! Where the logs go and how they look: stderr (so `-o json` stays clean on
//! stdout), filtered by `CONNDRAIN_LOG`, as text or as JSON lines.

use std::{ffi::OsStr, io::IsTerminal as _};

use tracing_subscriber::EnvFilter;

/// `conndrain agent --log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people; coloured on a terminal unless `NO_COLOR` is set.
    #[default]
    Text,
    /// One JSON object per line, for log collectors: `timestamp`, `level`,
    /// `message` and the event's other fields at the top level, `target`.
    Json,
}

/// Whether to colour output: only on a terminal, and not when `NO_COLOR` is
/// set to anything but the empty string (<https://no-color.org>).
#[must_use]
pub fn colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CONNDRAIN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            fmt.with_ansi(colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref())).init();
        }
        LogFormat::Json => fmt.json().flatten_event(true).with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour;

    #[test]
    fn no_color_set_to_anything_turns_colour_off() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))), "an empty NO_COLOR is unset");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("false"))), "any value, even this one");
        assert!(!colour(false, None), "never in a pipe or file");
    }
}
