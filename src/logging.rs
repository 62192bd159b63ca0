//! The log lines every fanjet process writes to stderr: one setup for the
//! `fanjet` binary, the benchmark and the chaos run, so they read alike.
//!
//! Colour only when stderr is a terminal: `just demo > log`, a pipe into
//! `grep` or a systemd journal get plain text. `NO_COLOR` (any value) turns
//! colour off on a terminal too.

use std::io::IsTerminal;

/// Installs the process's log subscriber: level from `FANJET_LOG` (an
/// `EnvFilter` directive such as `debug` or `info,fanjet::manager=debug`),
/// else `default_filter`.
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FANJET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").is_some(),
        ))
        .with_writer(std::io::stderr)
        .init();
}

fn colour(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, false));
        assert!(!colour(false, false));
        assert!(!colour(true, true));
        assert!(!colour(false, true));
    }
}
