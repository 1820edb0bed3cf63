// SPDX-License-Identifier: Apache-2.0
//! A small HTTP/1.1 server on a Unix socket for the API: requests parsed with `httparse`
//! (hyper's parser), answered one at a time by a handler, on one thread.
//!
//! Everything a client sends is bounded: at most [`MAX_CONNECTIONS`] connections (more are
//! answered 503 and closed), [`MAX_HEADER_BYTES`] of request line and headers, a body of at
//! most the payload limit (Firecracker's default, 51 200 bytes: a larger one is answered 413
//! without being read), and a connection idle for [`IDLE_TIMEOUT`] (a half-written request)
//! is closed. So a socket flooded with connections or with a 10 MB body costs ember a fixed
//! amount of memory, and the VM, which runs on other threads, does not notice.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most bytes of request line and headers.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Firecracker's default body limit (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing one response may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with a JSON body.
    pub fn json(body: String) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// An error with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Self {
            status,
            body: Some(body),
        }
    }

    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nServer: ember API\r\nConnection: {}\r\n",
            self.status,
            if keep_alive { "keep-alive" } else { "close" }
        );
        match &self.body {
            Some(b) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                ));
            }
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        out.into_bytes()
    }
}

/// Errors binding the socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something is at the path already.
    #[error(
        "--api-sock {0}: the path exists already (a socket left by an earlier run?): remove \
         it, or give another path"
    )]
    Exists(PathBuf),
    /// bind(2) failed.
    #[error("--api-sock {0}: cannot create the socket: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    last: Instant,
}

/// What parsing the front of a connection's buffer gave.
enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A whole request of `used` bytes.
    Done(Request, usize, bool),
    /// An answer to send before closing the connection.
    Fail(Response),
}

/// The server: a listening socket and its connections.
#[derive(Debug)]
pub struct HttpServer {
    listener: UnixListener,
    path: PathBuf,
    max_payload: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl HttpServer {
    /// Creates the socket at `path` (which must not exist) with a body limit.
    pub fn bind(path: &Path, max_payload: usize) -> Result<Self, BindError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(BindError::Exists(path.to_path_buf()));
        }
        let listener =
            UnixListener::bind(path).map_err(|e| BindError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| BindError::Bind(path.to_path_buf(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            max_payload,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests with `handler` until `stop` is set (checked at least every 200 ms).
    pub fn serve(&self, stop: &AtomicBool, handler: &mut dyn FnMut(Request) -> Response) {
        let mut conns: Vec<Conn> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &conns {
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("API socket: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let mut closed = vec![false; conns.len()];
            for (i, pfd) in fds.iter().enumerate().skip(1) {
                if pfd.revents == 0 {
                    continue;
                }
                let c = &mut conns[i - 1];
                closed[i - 1] = !self.on_readable(c, handler);
            }
            let now = Instant::now();
            let mut i = 0;
            conns.retain(|c| {
                let keep = !closed[i] && now.duration_since(c.last) < IDLE_TIMEOUT;
                i += 1;
                keep
            });
            if fds[0].revents != 0 {
                self.accept_all(&mut conns);
            }
        }
    }

    /// Accepts every waiting connection; beyond [`MAX_CONNECTIONS`] each is answered 503.
    fn accept_all(&self, conns: &mut Vec<Conn>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        crate::guest_log!(
                            log::Level::Warn,
                            "API socket: more than {MAX_CONNECTIONS} connections; refusing one"
                        );
                        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                        let msg = format!(
                            "too many connections (at most {MAX_CONNECTIONS}): close idle ones"
                        );
                        let _ = (&stream).write_all(&Response::fault(503, &msg).encode(false));
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    conns.push(Conn {
                        stream,
                        buf: Vec::new(),
                        last: Instant::now(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("API socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what `c` sent and answers every whole request in it; false: close it.
    fn on_readable(&self, c: &mut Conn, handler: &mut dyn FnMut(Request) -> Response) -> bool {
        let limit = MAX_HEADER_BYTES + self.max_payload;
        let mut chunk = [0u8; 8192];
        loop {
            if c.buf.len() >= limit {
                break;
            }
            let room = (limit - c.buf.len()).min(chunk.len());
            match c.stream.read(&mut chunk[..room]) {
                Ok(0) => return false,
                Ok(n) => {
                    c.buf.extend_from_slice(&chunk[..n]);
                    c.last = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        loop {
            match parse(&c.buf, self.max_payload) {
                Parsed::Partial => {
                    // A full buffer that is still not a request cannot become one.
                    if c.buf.len() >= limit {
                        let r = Response::fault(400, "the request is too large");
                        let _ = send(&c.stream, &r, false);
                        return false;
                    }
                    return true;
                }
                Parsed::Fail(r) => {
                    let _ = send(&c.stream, &r, false);
                    return false;
                }
                Parsed::Done(req, used, keep_alive) => {
                    c.buf.drain(..used);
                    let resp = handler(req);
                    if send(&c.stream, &resp, keep_alive).is_err() || !keep_alive {
                        return false;
                    }
                }
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `r` on `stream` (blocking for at most [`WRITE_TIMEOUT`]).
fn send(stream: &UnixStream, r: &Response, keep_alive: bool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let result = (&*stream).write_all(&r.encode(keep_alive));
    stream.set_nonblocking(true)?;
    result
}

/// Parses the request at the front of `buf`.
fn parse(buf: &[u8], max_payload: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Parsed::Fail(Response::fault(
                    431,
                    &format!("the request line and headers exceed {MAX_HEADER_BYTES} bytes"),
                ));
            }
            return Parsed::Partial;
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Fail(Response::fault(431, "too many headers (at most 32)"))
        }
        Err(e) => return Parsed::Fail(Response::fault(400, &format!("malformed request: {e}"))),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let version = req.version.unwrap_or(1);
    let mut length = 0usize;
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) => length = n,
                Err(_) => {
                    return Parsed::Fail(Response::fault(
                        400,
                        &format!("Content-Length {value:?} is not a number"),
                    ))
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Fail(Response::fault(
                501,
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    if length > max_payload {
        return Parsed::Fail(Response::fault(
            413,
            &format!("the request body is {length} bytes; at most {max_payload} are accepted"),
        ));
    }
    if buf.len() < head + length {
        return Parsed::Partial;
    }
    let body = buf[head..head + length].to_vec();
    Parsed::Done(Request { method, path, body }, head + length, keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Request, usize, bool) {
        match parse(buf, DEFAULT_MAX_PAYLOAD) {
            Parsed::Done(r, n, k) => (r, n, k),
            Parsed::Partial => panic!("partial"),
            Parsed::Fail(r) => panic!("fail: {r:?}"),
        }
    }

    #[test]
    fn requests_parse_whole_and_pipelined() {
        let one = b"PUT /drives/rootfs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}";
        let (r, n, k) = done(one);
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PUT", "/drives/rootfs")
        );
        assert_eq!((r.body.as_slice(), n, k), (&b"{}"[..], one.len(), true));
        let mut two = one.to_vec();
        two.extend_from_slice(b"GET /?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n");
        let (_, n, _) = done(&two);
        let (r, _, k) = done(&two[n..]);
        assert_eq!((r.path.as_str(), k), ("/", false));
    }

    #[test]
    fn partial_oversized_and_malformed_requests() {
        assert!(matches!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", 100),
            Parsed::Partial
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost:", 100),
            Parsed::Partial
        ));
        let Parsed::Fail(r) = parse(b"PUT /x HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n", 100)
        else {
            panic!("a 10 MB body must be refused before it is read");
        };
        assert_eq!(r.status, 413);
        let Parsed::Fail(r) = parse(b"\x01\x02 garbage\r\n\r\n", 100) else {
            panic!("garbage must be refused");
        };
        assert_eq!(r.status, 400);
        let Parsed::Fail(r) = parse(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", 100) else {
            panic!("a bad length must be refused");
        };
        assert_eq!(r.status, 400);
        let Parsed::Fail(r) = parse(
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            100,
        ) else {
            panic!("chunked must be refused");
        };
        assert_eq!(r.status, 501);
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEADER_BYTES + 1));
        let Parsed::Fail(r) = parse(big.as_bytes(), 100) else {
            panic!("huge headers must be refused");
        };
        assert_eq!(r.status, 431);
    }

    #[test]
    fn responses_are_well_formed() {
        let r = String::from_utf8(Response::fault(400, "no \"x\"").encode(true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        assert!(
            r.ends_with("\r\n\r\n{\"fault_message\":\"no \\\"x\\\"\"}"),
            "{r}"
        );
        let r = String::from_utf8(Response::no_content().encode(false)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 204 No Content\r\nServer: ember API\r\nConnection: close\r\n\r\n"
        );
    }
}
