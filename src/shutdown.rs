//! Signals to cancellation: the first SIGTERM or Ctrl-C cancels the root
//! token (graceful: stop pulling, finish in-flight work); a second one, or
//! the end of the grace period, exits at once. Stopping may wait on NATS
//! (a last checkpoint, an outcome to report): when NATS is gone, those wait
//! out their time-outs, and one signal must still be enough.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

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
