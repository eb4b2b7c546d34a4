//! The control protocol's messages, shared by the server side (`control`)
//! and by `replctl` (through `control::client`). A connection carries one
//! JSON request line and gets one JSON answer line; `events` instead gets
//! a stream of `StatusEvent` lines. `docs/control.md` specifies the JSON,
//! and the tests below pin it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

pub use crate::meta::Inspection;
pub use crate::repl::{DecisionStatus, GenerationStatus, ResourceStatus};

/// A request: `{"verb": VERB, "resource": RES, OPTIONS...}`. Unknown verbs
/// and unknown fields are refused; absent options are false (or 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every resource, or the one named.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
    },
    OutOfSync {
        resource: String,
    },
    CreateMd {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    DumpMd {
        resource: String,
    },
    Up {
        resource: String,
    },
    Down {
        resource: String,
    },
    Promote {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    Demote {
        resource: String,
        #[serde(default)]
        force: bool,
        /// How long to wait for clients to go (`force`) and for requests
        /// in flight to finish before refusing; absent: 30 s.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Connect {
        resource: String,
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    NewCurrentUuid {
        resource: String,
        #[serde(default)]
        clear_bitmap: bool,
    },
    /// Online verify; `stop` stops the one running.
    Verify {
        resource: String,
        #[serde(default)]
        stop: bool,
    },
    Invalidate {
        resource: String,
    },
    InvalidateRemote {
        resource: String,
    },
    WaitSync {
        resource: String,
        /// 0 waits until synced or the client hangs up.
        #[serde(default)]
        timeout_ms: u64,
    },
    /// Mark this node's data Outdated (a peer's fence handler runs it).
    Outdate {
        resource: String,
    },
    /// Release writes frozen by fencing; the operator vouches that the
    /// peer is fenced.
    ResumeIo {
        resource: String,
    },
    /// A stream of `StatusEvent` lines instead of one answer.
    Events {},
    /// Changes the resync rate settings at run time; absent values stay.
    ResyncRate {
        resource: String,
        /// 0: unlimited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rate_mib: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_rate_mib: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fill_target_kib: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan_ahead_ms: Option<u64>,
    },
}

/// `status`: this node's name and the status of each resource asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub node: String,
    pub resources: Vec<ResourceStatus>,
}

/// `out-of-sync`: the byte runs `[offset, length]` marked out of sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfSyncAnswer {
    pub resource: String,
    pub runs: Vec<(u64, u64)>,
}

/// `dump-md`: both superblock slots as read from disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpMdAnswer {
    pub resource: String,
    pub metadata: Inspection,
}

/// Every other verb: what was done, in one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageAnswer {
    pub message: String,
}

/// A successful answer; on the wire its fields follow `"ok": true`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Status(StatusAnswer),
    OutOfSync(OutOfSyncAnswer),
    DumpMd(Box<DumpMdAnswer>),
    Message(MessageAnswer),
}

/// One answer line: `{"ok": true, FIELDS...}` with the answer's fields,
/// or `{"ok": false, "error": TEXT}` with the one-line reason.
#[derive(Debug, Clone)]
pub enum Response {
    Ok(Answer),
    Err(String),
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Done<'a> {
            ok: bool,
            #[serde(flatten)]
            answer: &'a Answer,
        }
        #[derive(Serialize)]
        struct Failed<'a> {
            ok: bool,
            error: &'a str,
        }
        match self {
            Response::Ok(answer) => Done { ok: true, answer }.serialize(s),
            Response::Err(error) => Failed { ok: false, error }.serialize(s),
        }
    }
}

impl Response {
    /// A failure with `error`'s one-line reason.
    pub fn error(error: &dyn std::fmt::Display) -> Response {
        Response::Err(error.to_string())
    }

    /// The JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Only a bug can get here (the types serialize); still answer.
            serde_json::json!({"ok": false, "error": format!("cannot encode the answer: {e}")})
                .to_string()
        })
    }
}

/// Reads an answer line that should carry a `T`: `Ok(Ok(answer))`, or
/// `Ok(Err(reason))` when the daemon refused or failed.
pub fn parse_answer<T: DeserializeOwned>(line: &str) -> serde_json::Result<Result<T, String>> {
    let value: Value = serde_json::from_str(line)?;
    if value.get("ok") == Some(&Value::Bool(true)) {
        return serde_json::from_value(value).map(Ok);
    }
    Ok(Err(failure(&value)))
}

fn failure(value: &Value) -> String {
    value
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed")
        .to_owned()
}

/// Whether an `events` line is the state at subscription or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// One per resource when the stream starts.
    Exists,
    Change,
    /// An online verify started or ended (see `verify` in the status).
    Verify,
    /// About once a second while this node sends a resync, and once at
    /// its end: the status with its `resync` progress.
    Progress,
}

/// One `events` line: a `status` object with an added `"type"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(flatten)]
    pub status: ResourceStatus,
}

/// Reads one `events` line: the event, or `Err(reason)` if the daemon
/// refused the stream (`{"ok": false, ...}`).
pub fn parse_event(line: &str) -> serde_json::Result<Result<StatusEvent, String>> {
    let value: Value = serde_json::from_str(line)?;
    if value.get("ok") == Some(&Value::Bool(false)) {
        return Ok(Err(failure(&value)));
    }
    serde_json::from_value(value).map(Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::{ConnState, DiskState, ReplState, Role};
    use serde_json::json;

    fn request(v: Value) -> Result<Request, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn documented_requests_parse() {
        let r = |resource: &str| resource.to_owned();
        let cases = [
            (
                json!({"verb": "status"}),
                Request::Status { resource: None },
            ),
            // What replctl sent before the types were shared.
            (
                json!({"verb": "status", "resource": null}),
                Request::Status { resource: None },
            ),
            (
                json!({"verb": "status", "resource": "r0"}),
                Request::Status {
                    resource: Some(r("r0")),
                },
            ),
            (
                json!({"verb": "out-of-sync", "resource": "r0"}),
                Request::OutOfSync { resource: r("r0") },
            ),
            (
                json!({"verb": "create-md", "resource": "r0", "force": true}),
                Request::CreateMd {
                    resource: r("r0"),
                    force: true,
                },
            ),
            (
                json!({"verb": "dump-md", "resource": "r0"}),
                Request::DumpMd { resource: r("r0") },
            ),
            (
                json!({"verb": "up", "resource": "r0"}),
                Request::Up { resource: r("r0") },
            ),
            (
                json!({"verb": "down", "resource": "r0"}),
                Request::Down { resource: r("r0") },
            ),
            (
                json!({"verb": "promote", "resource": "r0"}),
                Request::Promote {
                    resource: r("r0"),
                    force: false,
                },
            ),
            (
                json!({"verb": "demote", "resource": "r0", "force": false}),
                Request::Demote {
                    resource: r("r0"),
                    force: false,
                    timeout_ms: None,
                },
            ),
            (
                json!({"verb": "demote", "resource": "r0", "timeout_ms": 2000}),
                Request::Demote {
                    resource: r("r0"),
                    force: false,
                    timeout_ms: Some(2000),
                },
            ),
            (
                json!({"verb": "connect", "resource": "r0", "discard_my_data": true}),
                Request::Connect {
                    resource: r("r0"),
                    discard_my_data: true,
                },
            ),
            (
                json!({"verb": "disconnect", "resource": "r0"}),
                Request::Disconnect { resource: r("r0") },
            ),
            (
                json!({"verb": "new-current-uuid", "resource": "r0", "clear_bitmap": true}),
                Request::NewCurrentUuid {
                    resource: r("r0"),
                    clear_bitmap: true,
                },
            ),
            (
                json!({"verb": "wait-sync", "resource": "r0", "timeout_ms": 500}),
                Request::WaitSync {
                    resource: r("r0"),
                    timeout_ms: 500,
                },
            ),
            (json!({"verb": "events"}), Request::Events {}),
            (
                json!({"verb": "resync-rate", "resource": "r0", "max_rate_mib": 0, "min_rate_mib": 8}),
                Request::ResyncRate {
                    resource: r("r0"),
                    max_rate_mib: Some(0),
                    min_rate_mib: Some(8),
                    fill_target_kib: None,
                    plan_ahead_ms: None,
                },
            ),
        ];
        for (wire, want) in cases {
            assert_eq!(request(wire.clone()).expect("parses"), want, "{wire}");
            // And what a client sends reads back the same.
            let sent = serde_json::to_value(&want).expect("serializes");
            assert_eq!(request(sent).expect("round trip"), want);
        }
    }

    #[test]
    fn unknown_verbs_fields_and_missing_resources_are_refused() {
        for bad in [
            json!({"verb": "launch-missiles", "resource": "r0"}),
            json!({"verb": "promote"}),
            json!({"verb": "status", "extra": 1}),
            json!({"resource": "r0"}),
            json!("status"),
        ] {
            assert!(request(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_are_sent_as_documented() {
        let sent = serde_json::to_value(Request::Status { resource: None }).expect("json");
        assert_eq!(sent, json!({"verb": "status"}));
        let sent = serde_json::to_value(Request::Demote {
            resource: "r0".into(),
            force: true,
            timeout_ms: None,
        })
        .expect("json");
        assert_eq!(
            sent,
            json!({"verb": "demote", "resource": "r0", "force": true})
        );
    }

    fn status() -> ResourceStatus {
        ResourceStatus {
            name: "r0".into(),
            node: "alpha".into(),
            up: true,
            down_reason: None,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            size: 4096,
            connection: ConnState::Connected,
            replication: ReplState::Established,
            peer: Some("beta".into()),
            peer_role: Some(Role::Secondary),
            peer_disk: Some(DiskState::UpToDate),
            out_of_sync_bytes: 0,
            out_of_sync_blocks: 0,
            bitmap_granularity: 4096,
            decision: None,
            generations: None,
            last_error: None,
            ping_rtt_us: Some(42),
            unstable_writes: Some(0),
            split_brain_policy: None,
            split_brain: None,
            verify: None,
            io_frozen: false,
            peer_fenced: true,
            activity_log: None,
            resync: Default::default(),
            resync_rate: Default::default(),
            disk_failure: None,
        }
    }

    #[test]
    fn answers_carry_ok_and_read_back() {
        let line = Response::Ok(Answer::Message(MessageAnswer {
            message: "r0 is Primary".into(),
        }))
        .to_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v, json!({"ok": true, "message": "r0 is Primary"}));
        let read: MessageAnswer = parse_answer(&line).expect("json").expect("ok");
        assert_eq!(read.message, "r0 is Primary");

        let line = Response::Ok(Answer::OutOfSync(OutOfSyncAnswer {
            resource: "r0".into(),
            runs: vec![(0, 4096), (8192, 65536)],
        }))
        .to_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(
            v,
            json!({"ok": true, "resource": "r0", "runs": [[0, 4096], [8192, 65536]]})
        );
        let read: OutOfSyncAnswer = parse_answer(&line).expect("json").expect("ok");
        assert_eq!(read.runs, vec![(0, 4096), (8192, 65536)]);

        let line = Response::Ok(Answer::Status(StatusAnswer {
            node: "alpha".into(),
            resources: vec![status()],
        }))
        .to_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["ok"], true);
        assert_eq!(v["node"], "alpha");
        assert_eq!(v["resources"][0]["role"], "Primary");
        assert_eq!(v["resources"][0]["peer_disk"], "UpToDate");
        assert_eq!(v["resources"][0]["io_frozen"], false);
        assert_eq!(v["resources"][0]["peer_fenced"], true);
        let read: StatusAnswer = parse_answer(&line).expect("json").expect("ok");
        assert_eq!(read.resources[0].ping_rtt_us, Some(42));
        // Fields added later default when an older daemon omits them.
        let mut old = v["resources"][0].clone();
        old.as_object_mut().expect("object").remove("io_frozen");
        let st: ResourceStatus = serde_json::from_value(old).expect("older status");
        assert!(!st.io_frozen);
        for (verb, req) in [
            (
                "outdate",
                Request::Outdate {
                    resource: "r0".into(),
                },
            ),
            (
                "resume-io",
                Request::ResumeIo {
                    resource: "r0".into(),
                },
            ),
        ] {
            let j = json!({"verb": verb, "resource": "r0"});
            assert_eq!(serde_json::to_value(&req).expect("json"), j);
            assert_eq!(serde_json::from_value::<Request>(j).expect("parse"), req);
        }
    }

    #[test]
    fn a_failure_is_its_one_line_reason() {
        let line = Response::error(&"promote refused: peer is Primary").to_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(
            v,
            json!({"ok": false, "error": "promote refused: peer is Primary"})
        );
        let read = parse_answer::<MessageAnswer>(&line).expect("json");
        assert_eq!(
            read.err().as_deref(),
            Some("promote refused: peer is Primary")
        );
        assert!(parse_answer::<MessageAnswer>("not json").is_err());
    }

    #[test]
    fn event_lines_are_status_with_a_type() {
        let event = StatusEvent {
            kind: EventKind::Exists,
            status: status(),
        };
        let v = serde_json::to_value(&event).expect("json");
        assert_eq!(v["type"], "exists");
        assert_eq!(v["name"], "r0");
        // The change events the replica broadcasts have the same shape.
        let change = crate::repl::event_json("change", &status());
        let read = parse_event(&change.to_string())
            .expect("json")
            .expect("event");
        assert_eq!(read.kind, EventKind::Change);
        assert_eq!(read.status.role, Role::Primary);
        let refused =
            parse_event(r#"{"ok":false,"error":"too many control connections"}"#).expect("json");
        assert_eq!(
            refused.err().as_deref(),
            Some("too many control connections")
        );
    }
}
