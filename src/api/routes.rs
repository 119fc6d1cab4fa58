//! The API's endpoints (see `docs/api/openapi.yaml`). Each handler reads
//! and checks its request, then does its work on the monitor under the
//! monitor's lock on a blocking thread ([`on_monitor`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, MAX_BODY};
use crate::config::schema::from_json;
use crate::config::{policy_from_spec, vm_from_spec, PolicySpec, VmSpec};
use crate::monitor::Monitor;

type Shared = Arc<Mutex<Monitor>>;
type Reply = Result<Response, ApiError>;

/// Names request bodies in errors.
const BODY: &str = "request body";

pub fn router(monitor: Shared) -> Router {
    Router::new()
        .route("/v1/vms", get(list))
        .route("/v1/vms/{name}", get(show).put(add).delete(remove))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/move", post(move_vcpus))
        .route("/v1/vms/{name}/pmap", get(pmap))
        .route("/v1/memmap", get(memmap))
        .route("/v1/stats", get(stats))
        .route("/v1/policy", get(policy).put(set_policy))
        .route("/v1/events", get(events))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(monitor)
}

/// Runs `f` on the monitor, under its lock, on a blocking thread.
async fn on_monitor<T: Send + 'static>(
    monitor: &Shared,
    f: impl FnOnce(&mut Monitor) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let monitor = monitor.clone();
    tokio::task::spawn_blocking(move || f(&mut monitor.lock()))
        .await
        .map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))?
}

fn ok(value: impl serde::Serialize) -> Reply {
    Ok(Json(value).into_response())
}

/// A request body as JSON: too large is 413, not JSON is 400.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {MAX_BODY} bytes; allowed: at most {MAX_BODY}")
        } else {
            format!("cannot read the request body: {}", r.body_text())
        };
        ApiError::new(status, None, message)
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            None,
            format!("{BODY}: not valid JSON: {e}"),
        )
    })
}

async fn list(State(m): State<Shared>) -> Reply {
    ok(json!({ "vms": on_monitor(&m, |m| Ok(m.vm_infos())).await? }))
}

async fn show(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| Ok(m.vm_info(&name)?)).await?)
}

/// `PUT /v1/vms/{name}`: the body is a `[[vm]]` table as JSON, read into
/// the config's own types and checked as a config file's `[[vm]]` is; the
/// VM is built and started.
async fn add(
    State(m): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let mut spec: VmSpec = from_json(json_body(body)?, BODY)?;
    match &spec.name {
        None => spec.name = Some(name.clone()),
        Some(n) if *n == name => {}
        Some(other) => {
            return Err(ApiError::bad(
                "name",
                format!(
                    "{BODY}: key `name`: \"{other}\" differs from the name in the path (`{name}`); \
                     allowed: leave it out, or the same name"
                ),
            ))
        }
    }
    let info = on_monitor(&m, move |m| {
        let mut vms = vm_from_spec(&spec, BODY, m.topology().node_count())?;
        if vms.len() != 1 {
            return Err(ApiError::bad(
                "count",
                format!(
                    "{BODY}: key `count`: {} VMs asked for; allowed: 1 (PUT each VM by its own name)",
                    vms.len()
                ),
            ));
        }
        let vc = vms.remove(0);
        m.add_vm(&vc)?;
        Ok(m.vm_info(&vc.name)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn remove(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| Ok(m.remove(&name)?)).await?)
}

async fn pause(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| {
        m.pause(&name)?;
        Ok(m.vm_info(&name)?)
    })
    .await?)
}

async fn resume(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| {
        m.resume(&name)?;
        Ok(m.vm_info(&name)?)
    })
    .await?)
}

async fn stop(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| {
        m.stop(&name, "stopped through the API")?;
        Ok(m.vm_info(&name)?)
    })
    .await?)
}

/// The body of `POST /v1/vms/{name}/move`: `{"node": N, "vcpu": K}`.
fn move_request(value: &Value) -> Result<(usize, Option<usize>), ApiError> {
    let Some(object) = value.as_object() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            None,
            format!("{BODY}: expected a JSON object {{\"node\": N, \"vcpu\": K}}"),
        ));
    };
    if let Some(k) = object
        .keys()
        .find(|k| !["node", "vcpu"].contains(&k.as_str()))
    {
        return Err(ApiError::bad(
            k,
            format!("{BODY}: key `{k}`: unknown key; allowed here: node, vcpu"),
        ));
    }
    let number = |key: &str| -> Result<Option<usize>, ApiError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                ApiError::bad(
                    key,
                    format!("{BODY}: key `{key}`: {v} is not allowed; allowed: a node or vCPU index, 0 or more"),
                )
            }),
        }
    };
    let node = number("node")?.ok_or_else(|| {
        ApiError::bad(
            "node",
            format!("{BODY}: key `node` is required (the node to move to)"),
        )
    })?;
    Ok((node, number("vcpu")?))
}

async fn move_vcpus(
    State(m): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let (node, vcpu) = move_request(&json_body(body)?)?;
    ok(on_monitor(&m, move |m| {
        let note = m.move_vcpus(&name, node, vcpu, "API")?;
        Ok(json!({ "moved": note, "vm": m.vm_info(&name)? }))
    })
    .await?)
}

async fn pmap(State(m): State<Shared>, Path(name): Path<String>) -> Reply {
    ok(on_monitor(&m, move |m| {
        let runs = m.pmap(&name)?;
        Ok(json!({ "vm": name, "runs": runs }))
    })
    .await?)
}

async fn memmap(State(m): State<Shared>) -> Reply {
    ok(json!({ "nodes": on_monitor(&m, |m| Ok(m.memmap())).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// Run `Memory::verify` now, before answering.
    #[serde(default)]
    verify: bool,
}

async fn stats(
    State(m): State<Shared>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Query(q) = query.map_err(|e| {
        ApiError::bad(
            "verify",
            format!(
                "query: {}; allowed: verify=true or verify=false",
                e.body_text()
            ),
        )
    })?;
    ok(on_monitor(&m, move |m| {
        if q.verify {
            m.check("on request");
        }
        Ok(m.stats())
    })
    .await?)
}

async fn policy(State(m): State<Shared>) -> Reply {
    ok(on_monitor(&m, |m| {
        Ok(json!({ "policy": m.policy(), "status": m.policy_status() }))
    })
    .await?)
}

/// `PUT /v1/policy`: a policy file's tables as JSON, read into the
/// config's own types and checked as a policy file is; the service threads restart under it.
async fn set_policy(State(m): State<Shared>, body: Result<Bytes, BytesRejection>) -> Reply {
    let spec: PolicySpec = from_json(json_body(body)?, BODY)?;
    let policy = policy_from_spec(&spec, BODY)?;
    ok(on_monitor(&m, move |m| {
        m.set_policy(policy)
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(json!({ "policy": m.policy(), "status": m.policy_status() }))
    })
    .await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Events after this sequence number (0: every event kept).
    #[serde(default)]
    since: u64,
}

/// `GET /v1/events`: newline-delimited JSON, one event a line, as they
/// happen; the stream stays open.
async fn events(
    State(m): State<Shared>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Query(q) = query.map_err(|e| {
        ApiError::bad(
            "since",
            format!(
                "query: {}; allowed: since=N (a sequence number)",
                e.body_text()
            ),
        )
    })?;
    let stream = futures_util::stream::unfold((m, q.since, true), |(m, seq, first)| async move {
        loop {
            if !first {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let monitor = m.clone();
            let events = tokio::task::spawn_blocking(move || monitor.lock().events().after(seq))
                .await
                .ok()?;
            let Some(last) = events.last().map(|e| e.seq) else {
                if first {
                    // Send the headers and nothing else yet.
                    return Some((Ok::<_, Infallible>(Bytes::new()), (m, seq, false)));
                }
                continue;
            };
            let mut text = String::new();
            for e in &events {
                text.push_str(&serde_json::to_string(e).unwrap_or_default());
                text.push('\n');
            }
            return Some((Ok(Bytes::from(text)), (m, last, false)));
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        None,
        format!(
            "no endpoint {}; the endpoints are under /v1: vms, vms/NAME, vms/NAME/pause, \
             /resume, /stop, /move, /pmap, memmap, stats, policy, events (see docs/api/openapi.yaml)",
            uri.path()
        ),
    )
}

async fn not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        format!(
            "{method} is not allowed on {} (see docs/api/openapi.yaml)",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_bodies_name_the_field_at_fault() {
        assert_eq!(move_request(&json!({"node": 1})).unwrap(), (1, None));
        assert_eq!(
            move_request(&json!({"node": 1, "vcpu": 0})).unwrap(),
            (1, Some(0))
        );
        let e = move_request(&json!({"node": 1, "cpu": 0})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cpu"));
        let e = move_request(&json!({"node": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("node"));
        let e = move_request(&json!({})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("node"));
        assert!(move_request(&json!([1])).is_err());
    }
}
