//! The client side of the control socket, for `replctl` and the demo:
//! sends one `Request` and reads its typed answer (or, for `events`, the
//! stream of `StatusEvent` lines).

use std::io::{self, BufRead, BufReader, Lines, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use thiserror::Error;

use super::proto::{self, Request, StatusEvent};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach repld at {}: {error}", path.display())]
    Unreachable { path: PathBuf, error: io::Error },
    #[error("{0}")]
    Io(io::Error),
    #[error("repld closed the connection without answering")]
    NoAnswer,
    #[error("unreadable answer: {0}")]
    Unreadable(serde_json::Error),
    /// The daemon refused or failed; its one-line reason.
    #[error("{0}")]
    Daemon(String),
}

fn send(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<UnixStream, ClientError> {
    let mut conn = UnixStream::connect(socket).map_err(|error| ClientError::Unreachable {
        path: socket.to_owned(),
        error,
    })?;
    conn.set_read_timeout(timeout).map_err(ClientError::Io)?;
    let line = serde_json::to_string(req).map_err(|e| ClientError::Io(e.into()))?;
    writeln!(conn, "{line}").map_err(ClientError::Io)?;
    Ok(conn)
}

fn exchange(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<String, ClientError> {
    let conn = send(socket, req, timeout)?;
    let mut line = String::new();
    let n = BufReader::new(conn)
        .read_line(&mut line)
        .map_err(ClientError::Io)?;
    if n == 0 {
        return Err(ClientError::NoAnswer);
    }
    Ok(line.trim_end().to_owned())
}

/// Sends `req` and reads its answer as a `T` (`StatusAnswer`,
/// `MessageAnswer`, ...). `None` waits for it indefinitely (`wait-sync`).
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<T, ClientError> {
    let line = exchange(socket, req, timeout)?;
    proto::parse_answer(&line)
        .map_err(ClientError::Unreadable)?
        .map_err(ClientError::Daemon)
}

/// Like `request`, but returns the successful answer's JSON line as the
/// daemon sent it (`--json` output keeps fields this client does not know).
pub fn request_line(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<String, ClientError> {
    let line = exchange(socket, req, timeout)?;
    proto::parse_answer::<IgnoredAny>(&line)
        .map_err(ClientError::Unreadable)?
        .map_err(ClientError::Daemon)?;
    Ok(line)
}

/// `events`: the stream of lines, each with its event, until the daemon
/// goes away.
pub fn events(socket: &Path) -> Result<EventStream, ClientError> {
    let conn = send(socket, &Request::Events {}, None)?;
    Ok(EventStream {
        lines: BufReader::new(conn).lines(),
    })
}

pub struct EventStream {
    lines: Lines<BufReader<UnixStream>>,
}

impl Iterator for EventStream {
    /// The line as sent, and the event it carries.
    type Item = Result<(String, StatusEvent), ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.lines.next()? {
            Ok(line) => line,
            Err(e) => return Some(Err(ClientError::Io(e))),
        };
        Some(match proto::parse_event(&line) {
            Ok(Ok(event)) => Ok((line, event)),
            Ok(Err(reason)) => Err(ClientError::Daemon(reason)),
            Err(e) => Err(ClientError::Unreadable(e)),
        })
    }
}
