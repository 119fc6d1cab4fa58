//! The monitor's REST API: HTTP/1.1 with JSON bodies on a Unix socket
//! (`disco serve --api PATH`, `disco run CONFIG --api PATH`), served by
//! axum on a tokio runtime of its own. `docs/api/openapi.yaml` describes
//! every endpoint; [`routes`] has the handlers, [`client`] the client that
//! `disco ctl`, `disco top` and the tests use.
//!
//! The socket is made as the control socket's is (mode 0600, only a stale
//! socket replaced, `crate::control::bind_private`), and every connection's
//! peer must be the monitor's uid or root (`SO_PEERCRED`). Each connection
//! is a task of its own, so an idle or slow client holds nobody up; request
//! bodies are bounded ([`MAX_BODY`], 413 beyond). Handlers take the
//! monitor's lock on a blocking thread, never on the runtime's workers.

pub mod client;
pub mod ctl;
mod error;
mod routes;
pub mod top;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::Mutex;

use crate::monitor::Monitor;

pub use error::ApiError;

/// Largest request body; larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;

/// The API server: a thread running a tokio runtime that serves the
/// socket. Dropping it stops serving (open connections are closed) and
/// removes the socket file.
pub struct Server {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens at `path` and serves `monitor` until dropped.
    pub fn start(path: &Path, monitor: Arc<Mutex<Monitor>>) -> Result<Server> {
        let listener = crate::control::bind_private(path, "API socket")?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("disco-api")
            .enable_all()
            .build()
            .context("starting the API's runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = routes::router(monitor);
        let thread = std::thread::Builder::new()
            .name("disco-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => PeerChecked(l),
                        Err(e) => {
                            tracing::error!("API socket: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                tracing::error!("API server: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                // Connections still open (idle clients, event streams) end here.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })?;
        Ok(Server {
            path: path.to_path_buf(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The API's listener: accepts only peers of the monitor's uid or root.
struct PeerChecked(tokio::net::UnixListener);

impl axum::serve::Listener for PeerChecked {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use std::os::fd::AsRawFd;
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => match crate::control::peer_fd_allowed(stream.as_raw_fd()) {
                    Ok(()) => return (stream, addr),
                    Err(e) => tracing::warn!("API socket: refused a client: {e}"),
                },
                Err(e) => {
                    // Out of descriptors and the like: wait, then go on.
                    tracing::warn!("API socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}
