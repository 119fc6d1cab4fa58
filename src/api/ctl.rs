//! `disco ctl PATH COMMAND...`: a client of the API (or, when PATH is the
//! control socket of `disco run --control`, of its line protocol: `status`
//! and `move`). Commands map onto endpoints; answers print as JSON, except
//! `status`, one line per VM.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::client::{request, Answer};

/// The commands, for errors.
pub const USAGE: &str = "commands: status, show VM, add VM FILE.json (- for stdin), pause VM, \
    resume VM, stop VM, delete VM, move VM NODE [VCPU], pmap VM, memmap, stats, \
    policy [FILE.json], snapshot VM FILE [resume|stop], restore FILE NAME [MEMORY_NODE], \
    clone FILE COUNT|NAME,NAME.. [NODE,NODE..], migrate VM[,VM..] HOST:PORT";

const LIMIT: Duration = Duration::from_secs(60);

/// Whether `socket` answers HTTP (the API) rather than the line protocol.
pub fn speaks_api(socket: &Path) -> bool {
    request(socket, "GET", "/v1/policy", None, Duration::from_secs(5)).is_ok()
}

/// Runs one command against the API at `socket`: the text to print and
/// whether it succeeded.
pub fn run(socket: &Path, words: &[String]) -> Result<(String, bool)> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let number = |what: &str, s: &str| -> Result<u64> {
        s.parse()
            .with_context(|| format!("{what} `{s}` is not a number; {USAGE}"))
    };
    let read_body = |file: &str| -> Result<Vec<u8>> {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
        };
        Ok(text.into_bytes())
    };
    let (method, uri, body): (&str, String, Option<Vec<u8>>) = match w.as_slice() {
        ["status"] | ["list"] => {
            let a = request(socket, "GET", "/v1/vms", None, LIMIT)?;
            return Ok(match a.status {
                200 => (status_lines(&a.json()), true),
                _ => (error_text(&a), false),
            });
        }
        ["show", vm] => ("GET", format!("/v1/vms/{vm}"), None),
        ["add", vm, file] => ("PUT", format!("/v1/vms/{vm}"), Some(read_body(file)?)),
        ["pause", vm] => ("POST", format!("/v1/vms/{vm}/pause"), None),
        ["resume", vm] => ("POST", format!("/v1/vms/{vm}/resume"), None),
        ["stop", vm] => ("POST", format!("/v1/vms/{vm}/stop"), None),
        ["delete", vm] => ("DELETE", format!("/v1/vms/{vm}"), None),
        ["move", vm, node] => (
            "POST",
            format!("/v1/vms/{vm}/move"),
            Some(
                serde_json::json!({ "node": number("NODE", node)? })
                    .to_string()
                    .into_bytes(),
            ),
        ),
        ["move", vm, node, vcpu] => (
            "POST",
            format!("/v1/vms/{vm}/move"),
            Some(
                serde_json::json!({ "node": number("NODE", node)?, "vcpu": number("VCPU", vcpu)? })
                    .to_string()
                    .into_bytes(),
            ),
        ),
        ["snapshot", vm, file, rest @ ..] if rest.len() <= 1 => {
            let mut body = serde_json::json!({ "path": absolute(file)? });
            if let [then] = rest {
                body["then"] = (*then).into();
            }
            (
                "POST",
                format!("/v1/vms/{vm}/snapshot"),
                Some(body.to_string().into_bytes()),
            )
        }
        ["restore", file, name, rest @ ..] if rest.len() <= 1 => {
            let mut body = serde_json::json!({ "path": absolute(file)?, "name": name });
            if let [node] = rest {
                body["memory_node"] = number("MEMORY_NODE", node)?.into();
            }
            (
                "POST",
                "/v1/vms/restore".into(),
                Some(body.to_string().into_bytes()),
            )
        }
        ["clone", file, who, rest @ ..] if rest.len() <= 1 => {
            let mut body = serde_json::json!({ "path": absolute(file)? });
            match who.parse::<u64>() {
                Ok(count) => body["count"] = count.into(),
                Err(_) => body["names"] = who.split(',').collect::<Vec<_>>().into(),
            }
            if let [nodes] = rest {
                body["nodes"] = nodes
                    .split(',')
                    .map(|n| number("NODE", n))
                    .collect::<Result<Vec<_>>>()?
                    .into();
            }
            (
                "POST",
                "/v1/vms/clone".into(),
                Some(body.to_string().into_bytes()),
            )
        }
        ["migrate", vms, to] => {
            let body = serde_json::json!({ "vms": vms.split(',').collect::<Vec<_>>(), "to": to });
            let a = request(
                socket,
                "POST",
                "/v1/migrate",
                Some(body.to_string().as_bytes()),
                Duration::from_secs(600),
            )?;
            return Ok(match a.status {
                200 => {
                    match serde_json::from_value::<crate::migration::MigrationReport>(a.json()) {
                        Ok(r) => (r.lines().join("\n"), true),
                        Err(e) => (format!("cannot read the migration's report: {e}"), false),
                    }
                }
                _ => (error_text(&a), false),
            });
        }
        ["pmap", vm] => ("GET", format!("/v1/vms/{vm}/pmap"), None),
        ["memmap"] => ("GET", "/v1/memmap".into(), None),
        ["stats"] => ("GET", "/v1/stats".into(), None),
        ["policy"] => ("GET", "/v1/policy".into(), None),
        ["policy", file] => ("PUT", "/v1/policy".into(), Some(read_body(file)?)),
        ["events"] => bail!(
            "`events` is a stream: curl -N --unix-socket {} http://localhost/v1/events",
            socket.display()
        ),
        [] => bail!("no command; {USAGE}"),
        _ => bail!("cannot read `{}`; {USAGE}", words.join(" ")),
    };
    let a = request(socket, method, &uri, body.as_deref(), LIMIT)?;
    Ok(if a.status < 300 {
        (
            serde_json::to_string_pretty(&a.json()).unwrap_or(a.body),
            true,
        )
    } else {
        (error_text(&a), false)
    })
}

/// `file` as an absolute path (the monitor may run elsewhere in the tree).
fn absolute(file: &str) -> Result<String> {
    let p = std::path::absolute(file).with_context(|| format!("the path `{file}`"))?;
    Ok(p.display().to_string())
}

/// `error: MESSAGE` of an error answer.
fn error_text(a: &Answer) -> String {
    match a.json()["error"].as_str() {
        Some(e) => format!("error: {e}"),
        None => format!("error: HTTP {}: {}", a.status, a.body),
    }
}

/// One line per VM: name, state, vCPU nodes, result.
fn status_lines(list: &Value) -> String {
    let vms = list["vms"].as_array().cloned().unwrap_or_default();
    if vms.is_empty() {
        return "no VMs".into();
    }
    vms.iter()
        .map(|v| {
            let nodes: Vec<String> = v["vcpu_nodes"]
                .as_array()
                .map(|a| a.iter().map(|n| n.to_string()).collect())
                .unwrap_or_default();
            format!(
                "{} {} vcpu nodes {} result {}",
                v["name"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                nodes.join(","),
                v["result"]["status"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
