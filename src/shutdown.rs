//! Signals to cancellation: the first SIGTERM or Ctrl-C cancels the root
//! token (graceful: stop pulling, finish in-flight work); a second one exits
//! at once.

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Cancels `token` on the first signal; exits the process on the second.
pub fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_signal().await;
        warn!("shutting down: finishing in-flight work (send the signal again to exit now)");
        token.cancel();
        wait_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
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
