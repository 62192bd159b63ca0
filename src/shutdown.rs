//! Signals to cancellation: the first SIGTERM or Ctrl-C cancels the root
//! token (graceful: stop pulling, finish in-flight work); a second one, or
//! the end of the grace period, exits at once. Stopping may wait on NATS
//! (a last checkpoint, an outcome to report): when NATS is gone, those wait
//! out their time-outs, and one signal must still be enough. Until then,
//! a part of a process that fails is started again alone ([`supervise`]).

use std::time::Duration;

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// Cancels `token` on the first signal; exits the process on the second,
/// or `grace` after the first if it is still running.
pub fn on_signals(token: CancellationToken, grace: Duration) {
    tokio::spawn(async move {
        wait_signal().await;
        warn!(
            ?grace,
            "shutting down: finishing in-flight work (send the signal again to exit now)"
        );
        token.cancel();
        tokio::select! {
            _ = wait_signal() => {
                warn!("second signal: exiting now");
                std::process::exit(130);
            }
            _ = tokio::time::sleep(grace) => {
                warn!(?grace, "the grace period is over and stopping is not done (NATS unreachable?): exiting now");
                std::process::exit(1);
            }
        }
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `part` until `cancel`, starting it again (with a growing pause) when
/// it fails, so one consumer's trouble does not stop the others.
pub async fn supervise<F, Fut, E>(name: &'static str, cancel: CancellationToken, mut part: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    const FIRST_PAUSE: Duration = Duration::from_millis(200);
    let mut pause = FIRST_PAUSE;
    loop {
        let started = tokio::time::Instant::now();
        let result = part().await;
        // A part that ran a while before failing starts again soon: only
        // failures in a row lengthen the pause.
        if started.elapsed() >= Duration::from_secs(30) {
            pause = FIRST_PAUSE;
        }
        match result {
            Ok(()) if cancel.is_cancelled() => return,
            Ok(()) => error!(part = name, "stopped on its own; starting it again"),
            Err(e) => error!(part = name, error = %e, "failed; starting it again"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}
