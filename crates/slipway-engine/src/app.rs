//! A running app process, owned by one task so that "wait for exit" and "stop it" never contend
//! for the process handle.

use std::time::Duration;

use slipway_sandbox::{ExitStatus, Process};
use tokio::sync::{oneshot, watch};

/// How the app ended, once it has: its exit status, or why waiting for it failed.
pub type AppExit = Result<ExitStatus, String>;

/// Handle to a running app.
pub struct AppHandle {
    kill: std::sync::Mutex<Option<oneshot::Sender<Duration>>>,
    exit: watch::Receiver<Option<AppExit>>,
}

impl AppHandle {
    /// Takes ownership of the process and watches it.
    pub fn watch(mut process: Process) -> Self {
        let (kill_tx, kill_rx) = oneshot::channel::<Duration>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let grace = tokio::select! {
                status = process.wait() => {
                    let _ = exit_tx.send(Some(status.map_err(|e| e.to_string())));
                    return;
                }
                grace = kill_rx => grace.unwrap_or(Duration::ZERO),
            };
            let status = process.kill(grace).await;
            let _ = exit_tx.send(Some(status.map_err(|e| e.to_string())));
        });
        Self {
            kill: std::sync::Mutex::new(Some(kill_tx)),
            exit: exit_rx,
        }
    }

    /// Resolves when the app has exited (on its own or because it was stopped).
    pub async fn exited(&self) -> AppExit {
        let mut rx = self.exit.clone();
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("checked by wait_for"),
            Err(_) => Err("the app's watcher ended".into()),
        };
        result
    }

    /// SIGTERM, then SIGKILL after `grace`; waits until it is gone.
    pub async fn stop(&self, grace: Duration) -> AppExit {
        if let Some(tx) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(grace);
        }
        self.exited().await
    }
}
