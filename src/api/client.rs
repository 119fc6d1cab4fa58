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
/// at most `limit` for the whole answer.
pub fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
    limit: Duration,
) -> Result<Answer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::time::timeout(limit, send(socket, method, uri, body))
            .await
            .with_context(|| format!("{method} {uri}: no answer within {limit:?}"))?
    })
}

async fn send(socket: &Path, method: &str, uri: &str, body: Option<&[u8]>) -> Result<Answer> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the API at {}", socket.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
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
