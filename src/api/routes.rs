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
use crate::config::{
    policy_from_spec, vm_from_spec, CloneSpec, MigrateSpec, PolicySpec, RestoreSpec, SnapshotSpec,
    VmSpec,
};
use crate::monitor::{Monitor, PmapRuns, MEMMAP_CHUNK, PMAP_CHUNK};

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
        .route("/v1/vms/{name}/snapshot", post(snapshot))
        .route("/v1/vms/restore", post(restore))
        .route("/v1/vms/clone", post(clone))
        .route("/v1/migrate", post(migrate))
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

/// A snapshot file's path from a request: given, absolute (the monitor's
/// working directory is nobody's business).
fn snapshot_path(path: Option<String>) -> Result<std::path::PathBuf, ApiError> {
    let path = path.ok_or_else(|| {
        ApiError::bad(
            "path",
            format!("{BODY}: key `path` is required (the snapshot file)"),
        )
    })?;
    let p = std::path::PathBuf::from(&path);
    if !p.is_absolute() {
        return Err(ApiError::bad(
            "path",
            format!("{BODY}: key `path`: \"{path}\" is relative; allowed: an absolute path"),
        ));
    }
    Ok(p)
}

/// A list of node indices from a request, each below `nodes`.
fn node_list(key: &str, list: &[i64], nodes: usize) -> Result<Vec<usize>, ApiError> {
    list.iter()
        .enumerate()
        .map(|(i, &n)| {
            if n < 0 || n as usize >= nodes {
                Err(ApiError::bad(
                    key,
                    format!(
                        "{BODY}: key `{key}[{i}]`: {n} is not allowed; allowed: a node, 0 to {}",
                        nodes - 1
                    ),
                ))
            } else {
                Ok(n as usize)
            }
        })
        .collect()
}

/// `POST /v1/vms/{name}/snapshot`: `{"path": ..., "then": "resume"|"stop"}`.
async fn snapshot(
    State(m): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let spec: SnapshotSpec = from_json(json_body(body)?, BODY)?;
    let path = snapshot_path(spec.path)?;
    let then = match spec.then.as_deref() {
        None | Some("resume") => crate::monitor::AfterSnapshot::Resume,
        Some("stop") => crate::monitor::AfterSnapshot::Stop,
        Some(other) => {
            return Err(ApiError::bad(
                "then",
                format!(
                    "{BODY}: key `then`: \"{other}\" is not allowed; allowed: \"resume\", \"stop\""
                ),
            ))
        }
    };
    ok(on_monitor(&m, move |m| Ok(m.snapshot_vm(&name, &path, then)?)).await?)
}

/// `POST /v1/vms/restore`: `{"path": ..., "name": ..., "memory_node": N,
/// "vcpu_nodes": [...]}`; the VM is built and started.
async fn restore(State(m): State<Shared>, body: Result<Bytes, BytesRejection>) -> Reply {
    let spec: RestoreSpec = from_json(json_body(body)?, BODY)?;
    let path = snapshot_path(spec.path)?;
    let name = spec.name.filter(|n| !n.is_empty()).ok_or_else(|| {
        ApiError::bad(
            "name",
            format!("{BODY}: key `name` is required (the restored VM's name)"),
        )
    })?;
    let info = on_monitor(&m, move |m| {
        let nodes = m.topology().node_count();
        let memory_node = match spec.memory_node {
            Some(n) => Some(node_list("memory_node", &[n], nodes)?[0]),
            None => None,
        };
        let vcpu_nodes = match &spec.vcpu_nodes {
            Some(list) => Some(node_list("vcpu_nodes", list, nodes)?),
            None => None,
        };
        let options = crate::monitor::RestoreOptions {
            name: name.clone(),
            memory_node,
            vcpu_nodes,
        };
        let report = m.restore_vm(&path, &options)?;
        Ok(json!({ "restored": report, "vm": m.vm_info(&name)? }))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// `POST /v1/migrate`: `{"vms": [...], "to": "HOST:PORT", "max_rounds": N,
/// "throttle": bool}`; answers the migration's report once the target runs
/// the VMs (they are gone here then). The monitor's lock is not held
/// through the pre-copy rounds (`crate::migration::migrate`).
async fn migrate(State(m): State<Shared>, body: Result<Bytes, BytesRejection>) -> Reply {
    let spec: MigrateSpec = from_json(json_body(body)?, BODY)?;
    let vms = spec.vms.filter(|v| !v.is_empty()).ok_or_else(|| {
        ApiError::bad(
            "vms",
            format!("{BODY}: key `vms` is required (the VMs to migrate, at least one)"),
        )
    })?;
    let to = spec.to.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::bad(
            "to",
            format!("{BODY}: key `to` is required (HOST:PORT of the target's migration listener)"),
        )
    })?;
    let mut options = crate::migration::MigrateOptions::default();
    if let Some(n) = spec.max_rounds {
        if !(1..=1000).contains(&n) {
            return Err(ApiError::bad(
                "max_rounds",
                format!("{BODY}: key `max_rounds`: {n} is not allowed; allowed: 1 to 1000"),
            ));
        }
        options.max_rounds = n as u32;
    }
    if let Some(t) = spec.throttle {
        options.throttle = t;
    }
    let report =
        tokio::task::spawn_blocking(move || crate::migration::migrate(&m, &vms, &to, &options))
            .await
            .map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))?;
    match report {
        Ok(r) => ok(r),
        Err(crate::migration::MigrateError::Vm(e)) => Err(e.into()),
        Err(e @ crate::migration::MigrateError::Failed(_)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            Some("to"),
            e.to_string(),
        )),
    }
}

/// Most clones one request makes.
pub const MAX_CLONES: i64 = 1024;

/// `POST /v1/vms/clone`: `{"path": ..., "count": N | "names": [...],
/// "prefix": ..., "nodes": [...]}`; the clones are built and started.
async fn clone(State(m): State<Shared>, body: Result<Bytes, BytesRejection>) -> Reply {
    let spec: CloneSpec = from_json(json_body(body)?, BODY)?;
    let path = snapshot_path(spec.path)?;
    let names = match (spec.count, spec.names) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "count",
                format!("{BODY}: keys `count` and `names` go apart; allowed: one of them"),
            ))
        }
        (None, None) => {
            return Err(ApiError::bad(
                "count",
                format!("{BODY}: key `count` or `names` is required (how many clones)"),
            ))
        }
        (Some(count), None) => {
            if !(1..=MAX_CLONES).contains(&count) {
                return Err(ApiError::bad(
                    "count",
                    format!(
                        "{BODY}: key `count`: {count} is not allowed; allowed: 1 to {MAX_CLONES}"
                    ),
                ));
            }
            let prefix = match spec.prefix {
                Some(p) => p,
                None => crate::snapshot::open(&path)
                    .map(|(meta, _)| format!("{}-clone", meta.vm.name))
                    .map_err(crate::monitor::AddError::Snapshot)?,
            };
            (0..count).map(|k| format!("{prefix}-{k}")).collect()
        }
        (None, Some(names)) => {
            if names.is_empty() || names.len() as i64 > MAX_CLONES {
                return Err(ApiError::bad(
                    "names",
                    format!(
                        "{BODY}: key `names`: {} names; allowed: 1 to {MAX_CLONES}",
                        names.len()
                    ),
                ));
            }
            names
        }
    };
    let report = on_monitor(&m, move |m| {
        let nodes = node_list(
            "nodes",
            spec.nodes.as_deref().unwrap_or(&[]),
            m.topology().node_count(),
        )?;
        Ok(m.clone_vms(&path, &names, &nodes)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(report)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PmapQuery {
    /// `json` (one document, sent in pieces) or `ndjson` (a run a line).
    #[serde(default)]
    format: Format,
}

#[derive(Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Json,
    Ndjson,
}

/// A query string's error: 400 naming `field` and what is allowed.
fn query_error<'a>(
    field: &'a str,
    allowed: &'a str,
) -> impl FnOnce(axum::extract::rejection::QueryRejection) -> ApiError + 'a {
    move |e| {
        ApiError::bad(
            field,
            format!("query: {}; allowed: {allowed}", e.body_text()),
        )
    }
}

/// A streamed body: its pieces come from `next` (run on a blocking
/// thread, never under the monitor's lock) until it returns `None`.
fn streamed<S: Send + 'static>(
    content_type: &'static str,
    state: S,
    next: fn(&mut S) -> Option<String>,
) -> Response {
    let stream = futures_util::stream::unfold(Some(state), move |state| async move {
        let mut state = state?;
        let (piece, state) = tokio::task::spawn_blocking(move || (next(&mut state), state))
            .await
            .ok()?;
        piece.map(|p| (Ok::<_, Infallible>(Bytes::from(p)), Some(state)))
    });
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Where a streamed pmap is.
struct PmapStream {
    memory: Arc<crate::memory::Memory>,
    space: crate::memory::VmId,
    frames: u64,
    next_gfn: u64,
    runs: PmapRuns,
    format: Format,
    /// Runs sent so far (a JSON array needs commas between them).
    sent: u64,
    ended: bool,
}

impl PmapStream {
    fn text(&mut self, runs: &[crate::monitor::PmapRun]) -> String {
        let mut out = String::new();
        for r in runs {
            let line = serde_json::to_string(r).unwrap_or_default();
            match self.format {
                Format::Ndjson => {
                    out += &line;
                    out.push('\n');
                }
                Format::Json => {
                    if self.sent > 0 {
                        out.push(',');
                    }
                    out += &line;
                }
            }
            self.sent += 1;
        }
        out
    }

    /// The next piece: the runs completed by the next chunk of frames, or
    /// the end of the document.
    fn next(&mut self) -> Option<String> {
        if self.ended {
            return None;
        }
        if self.next_gfn < self.frames {
            let start = self.next_gfn;
            self.next_gfn = (start + PMAP_CHUNK).min(self.frames);
            match self.memory.pmap_chunk(self.space, start..self.next_gfn) {
                Ok(chunk) => {
                    chunk.iter().for_each(|f| self.runs.push(f));
                    let done = self.runs.take_done();
                    return Some(self.text(&done));
                }
                Err(e) => {
                    // The VM went away meanwhile: say so, and end.
                    self.ended = true;
                    let error = json!(format!("the VM's memory went away at frame {start}: {e:#}"));
                    return Some(match self.format {
                        Format::Ndjson => format!("{}\n", json!({ "error": error })),
                        Format::Json => format!("],\"error\":{error}}}"),
                    });
                }
            }
        }
        self.ended = true;
        let last = std::mem::take(&mut self.runs).finish();
        let mut out = self.text(&last);
        if self.format == Format::Json {
            out += "]}";
        }
        Some(out)
    }
}

/// `GET /v1/vms/{name}/pmap`: the VM's pmap as runs, built and sent
/// [`PMAP_CHUNK`] frames at a time; the monitor's lock is held only to
/// find the VM, the memory lock only for each chunk.
async fn pmap(
    State(m): State<Shared>,
    Path(name): Path<String>,
    query: Result<Query<PmapQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Query(q) = query.map_err(query_error("format", "format=json or format=ndjson"))?;
    let (source, memory) = on_monitor(&m, move |m| {
        Ok((m.pmap_source(&name).map(|s| (name, s))?, m.memory().clone()))
    })
    .await?;
    let (name, source) = source;
    let (space, frames) = source.unwrap_or((0, 0));
    let head = match q.format {
        Format::Json => format!("{{\"vm\":{},\"frames\":{frames},\"runs\":[", json!(name)),
        Format::Ndjson => String::new(),
    };
    let state = PmapStream {
        memory,
        space,
        frames,
        next_gfn: 0,
        runs: PmapRuns::default(),
        format: q.format,
        sent: 0,
        ended: false,
    };
    Ok(streamed(
        match q.format {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
        },
        (Some(head), state),
        |(head, s)| head.take().or_else(|| s.next()),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemmapQuery {
    /// Every machine page in use (a line each) instead of per node figures.
    #[serde(default)]
    detail: bool,
    /// Only this node's pages (implies detail).
    node: Option<usize>,
    /// Only pages from this index on (implies detail).
    from: Option<u32>,
    /// At most this many page slots from `from` (implies detail).
    count: Option<u32>,
}

/// Where a streamed memmap is.
struct MemmapStream {
    memory: Arc<crate::memory::Memory>,
    names: std::collections::HashMap<crate::memory::VmId, String>,
    /// Nodes still to walk, each with its range of page slots.
    todo: std::collections::VecDeque<(usize, std::ops::Range<u32>)>,
}

impl MemmapStream {
    fn next(&mut self) -> Option<String> {
        loop {
            let (node, range) = self.todo.front_mut()?;
            if range.start >= range.end {
                self.todo.pop_front();
                continue;
            }
            let node = *node;
            let end = range.start.saturating_add(MEMMAP_CHUNK).min(range.end);
            let chunk = self.memory.memmap_chunk(node, range.start..end);
            range.start = end;
            let mut out = String::new();
            for p in chunk {
                let owners: Vec<Value> = p
                    .owners
                    .iter()
                    .map(|(vm, gfn)| {
                        let name = self
                            .names
                            .get(vm)
                            .cloned()
                            .unwrap_or_else(|| format!("#{vm}"));
                        json!({ "vm": name, "gfn": gfn })
                    })
                    .collect();
                out += &json!({
                    "node": p.node,
                    "page": p.page,
                    "refcount": p.refcount,
                    "replica": p.replica,
                    "owners": owners,
                })
                .to_string();
                out.push('\n');
            }
            // An empty piece would end nothing, but costs a chunk header:
            // go on to the next chunk instead.
            if !out.is_empty() {
                return Some(out);
            }
        }
    }
}

/// `GET /v1/memmap`: per node, its pool, the guest frames it backs and its
/// pages by sharing state; with `detail=true` (or `node`, `from`, `count`)
/// every machine page in use, a line each (page, node, refcount, owners),
/// read [`MEMMAP_CHUNK`] pages per hold of the memory lock.
async fn memmap(
    State(m): State<Shared>,
    query: Result<Query<MemmapQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Query(q) = query.map_err(query_error(
        "detail",
        "detail=true|false, node=N, from=PAGE, count=PAGES",
    ))?;
    if !(q.detail || q.node.is_some() || q.from.is_some() || q.count.is_some()) {
        return ok(json!({ "nodes": on_monitor(&m, |m| Ok(m.memmap())).await? }));
    }
    let (memory, names) = on_monitor(&m, |m| {
        Ok((m.memory().clone(), m.space_names().into_iter().collect()))
    })
    .await?;
    let nodes = memory.node_count();
    if let Some(n) = q.node.filter(|&n| n >= nodes) {
        return Err(ApiError::bad(
            "node",
            format!(
                "query: node {n} does not exist; allowed: 0 to {}",
                nodes - 1
            ),
        ));
    }
    let from = q.from.unwrap_or(0);
    let todo = (0..nodes)
        .filter(|n| q.node.is_none_or(|only| only == *n))
        .map(|n| {
            let extent = memory.memmap_extent(n);
            let end = match q.count {
                Some(c) => from.saturating_add(c).min(extent),
                None => extent,
            };
            (n, from.min(end)..end)
        })
        .collect();
    Ok(streamed(
        "application/x-ndjson",
        MemmapStream {
            memory,
            names,
            todo,
        },
        MemmapStream::next,
    ))
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
