//! A small client of the API (hyper over the Unix socket), for `disco ctl`,
//! `disco top` and the tests: one request, the status and the body.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The answer to a request.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `method uri` with `body` (JSON) to the API at `socket` and waits
/// at most `limit` for the whole answer (connecting included).
pub fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
    limit: Duration,
) -> Result<Answer> {
    let runtime = runtime()?;
    runtime.block_on(async {
        tokio::time::timeout(limit, async {
            let mut sender = connect(socket).await?;
            send(&mut sender, method, uri, body).await
        })
        .await
        .with_context(|| format!("{method} {uri}: no answer within {limit:?}"))?
    })
}

/// One connection kept open for many requests (HTTP/1.1 keep-alive), as a
/// client that polls does: the API benchmark times requests on it, so that
/// connecting is not in every figure.
pub struct Connection {
    runtime: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    pub fn open(socket: &Path) -> Result<Connection> {
        let runtime = runtime()?;
        let sender = runtime.block_on(connect(socket))?;
        Ok(Connection { runtime, sender })
    }

    /// Sends `method uri` with `body` and waits at most `limit` for the
    /// whole answer.
    pub fn call(
        &mut self,
        method: &str,
        uri: &str,
        body: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Answer> {
        let sender = &mut self.sender;
        self.runtime.block_on(async {
            tokio::time::timeout(limit, send(sender, method, uri, body))
                .await
                .with_context(|| format!("{method} {uri}: no answer within {limit:?}"))?
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(socket: &Path) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the API at {}", socket.display()))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
) -> Result<Answer> {
    sender.ready().await.context("the connection is closed")?;
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder.body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{method} {uri}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
