//! Listening, readiness and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use r1serve_engine::ShutdownMode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::ServerError;
use crate::state::{AppState, ModelContext};
use crate::ServerConfig;

/// A running server. Dropping it stops accepting and aborts whatever is running.
pub struct Server {
    state: Arc<AppState>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Starts listening on `config.addr` (the model can be handed over later: until then
    /// `/health` and the API answer 503).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(&config.addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.addr.clone(),
                source,
            })?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AppState::new(config));
        let app = crate::routes::router(Arc::clone(&state));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::debug!(%addr, "listening");
        Ok(Self {
            state,
            addr,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Hands over the loaded model: from now on the server answers requests.
    pub fn set_ready(&self, model: ModelContext) -> Result<(), ServerError> {
        self.state
            .model
            .set(Arc::new(model))
            .map_err(|_| ServerError::AlreadyReady)?;
        info!(model = %self.state.config.served_model_name, "ready");
        Ok(())
    }

    pub fn model(&self) -> Option<Arc<ModelContext>> {
        self.state.model.get().cloned()
    }

    /// Sequences admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight()
    }

    /// Stops accepting connections and requests, gives running requests up to `drain` to
    /// finish, then aborts the rest and stops the engine.
    pub async fn shutdown(mut self, drain: Duration) -> Result<(), ServerError> {
        self.state.shutting_down.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let result = match tokio::time::timeout(drain, &mut task).await {
            Ok(result) => result,
            Err(_) => {
                warn!(
                    in_flight = self.state.in_flight(),
                    "requests still running after the drain period: aborting them"
                );
                self.stop_engine(ShutdownMode::Abort).await;
                match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
                    Ok(result) => result,
                    Err(_) => {
                        task.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        self.stop_engine(ShutdownMode::Drain).await;
        info!("server stopped");
        match result {
            Ok(io) => io.map_err(ServerError::Io),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(ServerError::Task(e.to_string())),
        }
    }

    async fn stop_engine(&self, mode: ShutdownMode) {
        if let Some(ctx) = self.state.model.get() {
            let engine = Arc::clone(&ctx.engine);
            let _ = tokio::task::spawn_blocking(move || engine.shutdown(mode)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.shutting_down.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
