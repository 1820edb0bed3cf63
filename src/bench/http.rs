// SPDX-License-Identifier: Apache-2.0
//! A minimal HTTP/1.1 client over a Unix socket, enough to drive Firecracker's API (the
//! `ember bench --snapshot` peer row): one request at a time on a kept-alive connection,
//! JSON bodies, responses framed by `Content-Length` (Firecracker's API server sends it with
//! every body and none with `204 No Content`).
//!
//! The response parser takes text from another process: it never panics, and it caps the
//! header and body sizes it accepts.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::json::Json;

/// Largest response header block accepted.
const MAX_HEADER: usize = 16 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 1 << 20;

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code (`204`).
    pub status: u16,
    /// Body as text (lossy UTF-8), empty when there is none.
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Firecracker's error text: the body's `fault_message`, else the body itself.
    pub fn fault_message(&self) -> String {
        Json::parse(&self.body)
            .ok()
            .and_then(|j| {
                j.get("fault_message")
                    .and_then(Json::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| self.body.trim().to_string())
    }
}

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket could not be reached, written or read.
    #[error("API socket {path}: {what}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server closed the connection before a whole response arrived.
    #[error("API socket {0}: the connection closed before a whole response arrived")]
    Closed(PathBuf),
    /// The response is not HTTP/1.x as this client understands it.
    #[error("API socket {path}: bad response: {what}")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// The bytes of one request. `body`, when given, is sent as `application/json`.
pub fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(b) = body {
        r.push_str("Content-Type: application/json\r\n");
        r.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    r.push_str("\r\n");
    if let Some(b) = body {
        r.push_str(b);
    }
    r.into_bytes()
}

/// Parses a response at the start of `buf`: `Ok(None)` while it is incomplete,
/// `Ok(Some((response, bytes used)))` once it is whole.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEADER {
            Err(format!("no end of headers in the first {MAX_HEADER} bytes"))
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEADER {
        return Err(format!("headers longer than {MAX_HEADER} bytes"));
    }
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    let version = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?} is not HTTP/1.x"));
    }
    let status = words
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line {line:?} has no colon"));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!("Transfer-Encoding {value:?} is not supported"));
        }
    }
    if length > MAX_BODY {
        return Err(format!("body of {length} bytes (at most {MAX_BODY})"));
    }
    // 1xx, 204 and 304 never have a body.
    if status < 200 || status == 204 || status == 304 {
        length = 0;
    }
    let start = end + 4;
    if buf.len() < start + length {
        return Ok(None);
    }
    let body = String::from_utf8_lossy(&buf[start..start + length]).into_owned();
    Ok(Some((Response { status, body }, start + length)))
}

/// A kept-alive connection to an HTTP server on a Unix socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `path`; each later read or write may take at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, HttpError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| HttpError::Io { path, what, source }
        };
        let stream = UnixStream::connect(path).map_err(io("cannot connect"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("cannot set a timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("cannot set a timeout"))?;
        Ok(Self {
            path: path.to_path_buf(),
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads its response (any status; see [`Response::is_success`]).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Json>,
    ) -> Result<Response, HttpError> {
        let body = body.map(Json::to_string);
        let req = request_bytes(method, path, body.as_deref());
        let sock = self.path.clone();
        self.stream
            .write_all(&req)
            .map_err(|source| HttpError::Io {
                path: sock.clone(),
                what: "cannot send the request",
                source,
            })?;
        let mut chunk = [0u8; 4096];
        loop {
            match parse_response(&self.buf) {
                Ok(Some((resp, used))) => {
                    self.buf.drain(..used);
                    return Ok(resp);
                }
                Ok(None) => {}
                Err(what) => return Err(HttpError::BadResponse { path: sock, what }),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(HttpError::Closed(sock)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(HttpError::Io {
                        path: sock,
                        what: "no response (timed out or failed)",
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_json_body_with_its_length() {
        let body = r#"{"state":"Paused"}"#;
        let r = String::from_utf8(request_bytes("PATCH", "/vm", Some(body))).unwrap();
        assert_eq!(
            r,
            "PATCH /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}"
        );
        let r = String::from_utf8(request_bytes("GET", "/", None)).unwrap();
        assert_eq!(
            r,
            "GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
    }

    #[test]
    fn firecracker_responses_parse() {
        // As Firecracker's API server sends them (captured from the peer binary).
        let ok = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        let (r, used) = parse_response(ok).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str(), used), (204, "", ok.len()));
        assert!(r.is_success());
        let err = b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
            Content-Type: application/json\r\nContent-Length: 31\r\n\r\n\
            {\"fault_message\":\"not booted.\"}HTTP/1.1 204 \r\n";
        let (r, used) = parse_response(err).unwrap().unwrap();
        assert_eq!(r.status, 400);
        assert!(!r.is_success());
        assert_eq!(r.fault_message(), "not booted.");
        // What follows belongs to the next response.
        assert_eq!(&err[used..], b"HTTP/1.1 204 \r\n");
    }

    #[test]
    fn incomplete_and_bad_responses() {
        let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody";
        for cut in 0..whole.len() {
            assert_eq!(parse_response(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse_response(whole).unwrap().unwrap().0.body,
            "body".to_string()
        );
        assert!(parse_response(b"SSH-2.0 hello\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200\r\nContent-Length: 99999999999\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200\r\nno colon\r\n\r\n").is_err());
        assert!(parse_response(&vec![b'a'; MAX_HEADER + 1]).is_err());
        // A non-JSON error body is its own message.
        let r = Response {
            status: 500,
            body: " oops \n".into(),
        };
        assert_eq!(r.fault_message(), "oops");
    }

    #[test]
    fn a_request_round_trip_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("ember-http-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Two requests on one connection; answer each once its body is in.
            for reply in [
                &b"HTTP/1.1 204 \r\n\r\n"[..],
                &b"HTTP/1.1 400 \r\nContent-Length: 25\r\n\r\n{\"fault_message\":\"nope\"}\n"[..],
            ] {
                loop {
                    let text = String::from_utf8_lossy(&got).into_owned();
                    if text.contains("\"Paused\"}") || text.contains("GET / ") {
                        break;
                    }
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&got).into_owned();
                got.clear();
                s.write_all(reply).unwrap();
                if text.starts_with("GET") {
                    break;
                }
                assert!(text.starts_with("PATCH /vm HTTP/1.1\r\n"), "{text}");
            }
        });
        let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
        let body = Json::obj([("state", Json::from("Paused"))]);
        let r = c.call("PATCH", "/vm", Some(&body)).unwrap();
        assert_eq!(r.status, 204);
        let r = c.call("GET", "/", None).unwrap();
        assert_eq!((r.status, r.fault_message().as_str()), (400, "nope"));
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Nobody listening: a clear error naming the socket.
        let e = Client::connect(&sock, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("api.sock"), "{e}");
    }
}
