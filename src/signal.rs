//! The signals of both roles: the shutdown signal `cp serve` and `agent`
//! take as their shutdown future, and SIGHUP, on which both re-read their
//! TLS files.

/// SIGTERM or SIGINT, whichever comes first.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// Calls `reload` on every SIGHUP, in a task that ends when the returned
/// handle is aborted. The handler is installed before this returns, so from
/// then on a SIGHUP never ends the process (its default action would).
/// Call it inside a tokio runtime.
pub fn spawn_on_sighup(reload: impl Fn() + Send + 'static) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            reload();
        }
    }))
}
