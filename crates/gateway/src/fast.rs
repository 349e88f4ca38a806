//! The gateway's connections from clients.
//!
//! Proxied requests are read and answered here without hyper: the request
//! head is parsed in place (httparse, as hyper does), its header lines are
//! copied to the upstream request as they are, and the answer's head is
//! written back the same way. No header map, no boxed service, no task but
//! the connection's own. What this path does not handle, it hands over,
//! with the bytes already read, to hyper for the rest of the connection
//! (`Front::handle`): the gateway's own endpoints, HTTP/1.0, chunked or
//! too-large request bodies, `Expect`, upgrades, CORS requests, anything
//! malformed (hyper's answer to it is the reference).
use std::{
    convert::Infallible,
    io,
    ops::Range,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use restaurant_platform::{
    http::{Problem, X_REQUEST_ID},
    shutdown::Shutdown,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use crate::{
    Front, GatewayResponse, MAX_PROXIED_BODY, OWN_PATHS, admit, forward,
    h1::{self, Field},
    observe, request_lines,
    upstream::{AnswerBody, Outgoing},
    upstream_target,
};

/// A client connection is closed this long after its last request began
/// if no other has arrived whole: idle keep-alive and slow senders alike.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The idle deadline moves at most this often: one timer per connection,
/// re-armed now and then, instead of one armed and dropped per read.
const DEADLINE_SLACK: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 4 * 1024;
/// Bodies up to this size are copied behind the head and written with it
/// in one system call; larger ones are written separately.
const COPY_BELOW: usize = 16 * 1024;

/// A request head this path forwards itself.
struct Head {
    len: usize,
    method: Method,
    /// The target, and where its path ends.
    target: Range<usize>,
    path_end: usize,
    fields: Vec<Field>,
    content_length: usize,
    /// The client said `Connection: close`.
    close: bool,
}

enum Parsed {
    Incomplete,
    Handoff,
    Head(Head),
}

fn parse(buf: &[u8], cors: bool) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= h1::MAX_HEAD => return Parsed::Incomplete,
        // Too large or malformed: hyper says so.
        _ => return Parsed::Handoff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Handoff;
    };
    let path = target.split('?').next().unwrap_or(target);
    if !target.starts_with('/') || OWN_PATHS.contains(&path) {
        return Parsed::Handoff;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Handoff;
    };
    let at = |part: &[u8]| h1::range_of(buf, part);
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut length: Option<u64> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match h1::content_length(h.value) {
                Some(n) if length.is_none() => length = Some(n),
                _ => return Parsed::Handoff,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
            || (cors && name.eq_ignore_ascii_case(b"origin"))
        {
            return Parsed::Handoff;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= h1::has_token(h.value, "close");
        }
        fields.push((at(name), at(h.value)));
    }
    let content_length = length.unwrap_or(0);
    if content_length > MAX_PROXIED_BODY as u64 {
        return Parsed::Handoff; // hyper's path reads it, then answers 413
    }
    let target = at(target.as_bytes());
    Parsed::Head(Head {
        len,
        method,
        path_end: target.start + path.len(),
        target,
        fields,
        content_length: content_length as usize,
        close,
    })
}

/// Reads more of a request. `false`: the connection is over (closed by the
/// client, past its deadline, or idle while the gateway is closing).
async fn fill(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    closing: &Shutdown,
    deadline: Pin<&mut tokio::time::Sleep>,
) -> bool {
    let idle = buf.is_empty();
    buf.reserve(READ_CHUNK);
    tokio::select! {
        biased;
        read = tcp.read_buf(buf) => matches!(read, Ok(n) if n > 0),
        _ = closing.wait(), if idle => false,
        _ = deadline => false,
    }
}

/// Serves one client connection until it closes.
pub(crate) async fn connection(front: Front, mut tcp: TcpStream, closing: Shutdown) {
    let cors = front.cors.is_some();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(READ_CHUNK);
    let mut armed = tokio::time::Instant::now();
    let mut deadline = pin!(tokio::time::sleep_until(armed + IDLE_TIMEOUT));
    loop {
        let now = tokio::time::Instant::now();
        if now - armed > DEADLINE_SLACK {
            armed = now;
            deadline.as_mut().reset(now + IDLE_TIMEOUT);
        }
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf, cors) {
                    Parsed::Head(head) => break head,
                    Parsed::Handoff => return handoff(front, tcp, buf.freeze(), closing).await,
                    Parsed::Incomplete => {}
                }
            }
            if !fill(&mut tcp, &mut buf, &closing, deadline.as_mut()).await {
                return;
            }
        };
        let raw = buf.split_to(head.len).freeze();
        while buf.len() < head.content_length {
            if !fill(&mut tcp, &mut buf, &closing, deadline.as_mut()).await {
                return;
            }
        }
        let body = buf.split_to(head.content_length).freeze();
        out.clear();
        let tail = answer(&front, &head, &raw, body, &mut out).await;
        // Closing (asked, or the gateway is shutting down): said in the
        // answer, so the client does not send on a connection about to go.
        let close = head.close || closing.is_triggered();
        if close {
            h1::put_header(&mut out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        if write(&mut tcp, &mut out, tail).await.is_err() || close {
            return;
        }
    }
}

/// What follows a response head.
enum Tail {
    Body(Bytes),
    /// Streamed, chunked when its length is unknown.
    Stream(crate::upstream::Streamed, bool),
}

/// Forwards one request; writes the answer's head into `out` up to (not
/// including) its final empty line, and returns its body.
async fn answer(front: &Front, head: &Head, raw: &Bytes, body: Bytes, out: &mut Vec<u8>) -> Tail {
    let target = raw.slice(head.target.clone());
    // httparse admits only visible ASCII in a target.
    let target_str = std::str::from_utf8(&target).unwrap_or("/");
    let path = &target_str[..head.path_end - head.target.start];
    let query = target_str[path.len()..].strip_prefix('?');
    let (route, _slot) = match admit(&front.gw, path) {
        Ok(admitted) => admitted,
        Err(problem) => return put_problem(out, problem, None),
    };
    let (lines, request_id) = request_lines(
        head.fields
            .iter()
            .map(|(n, v)| (&raw[n.clone()], &raw[v.clone()])),
    );
    let outgoing = Outgoing {
        method: head.method.clone(),
        target: upstream_target(route, path, query, target.clone()),
        lines,
        body,
    };
    let started = Instant::now();
    let (answer, retried) = forward(route, &outgoing).await;
    let (status, tail) = match answer {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let length = match &answer.body {
                AnswerBody::Whole(b) => Some(b.len() as u64),
                AnswerBody::Streamed(s) => s.len(),
            };
            h1::put_status(out, status);
            for (name, value) in answer.head.passed_on() {
                // Replaced by the request's own, below.
                if !name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes()) {
                    h1::put_header(out, name, value);
                }
            }
            h1::put_header(out, X_REQUEST_ID.as_str().as_bytes(), &request_id);
            if !answer.head.bodiless {
                match length {
                    Some(n) => h1::put_length(out, n),
                    None => h1::put_header(out, b"transfer-encoding", b"chunked"),
                }
            }
            let tail = match answer.body {
                AnswerBody::Whole(b) => Tail::Body(b),
                AnswerBody::Streamed(s) => Tail::Stream(s, length.is_none()),
            };
            (status, tail)
        }
        Err(problem) => {
            let status = problem.status;
            (status, put_problem(out, problem, Some(&request_id)))
        }
    };
    observe(
        route,
        &head.method,
        path,
        status,
        started.elapsed(),
        retried,
        &request_id,
    );
    tail
}

/// A problem's head into `out`; its body is returned.
fn put_problem(out: &mut Vec<u8>, problem: Problem, request_id: Option<&[u8]>) -> Tail {
    let res: http::Response<Bytes> = problem.into_http();
    h1::put_status(out, res.status());
    for (name, value) in res.headers() {
        h1::put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(id) = request_id {
        h1::put_header(out, X_REQUEST_ID.as_str().as_bytes(), id);
    }
    h1::put_length(out, res.body().len() as u64);
    Tail::Body(res.into_body())
}

/// Writes a response: its head (in `out`) and body.
async fn write(tcp: &mut TcpStream, out: &mut Vec<u8>, tail: Tail) -> io::Result<()> {
    match tail {
        Tail::Body(body) if body.len() < COPY_BELOW => {
            out.extend_from_slice(&body);
            tcp.write_all(out).await
        }
        Tail::Body(body) => {
            tcp.write_all(out).await?;
            tcp.write_all(&body).await
        }
        Tail::Stream(mut body, chunked) => {
            tcp.write_all(out).await?;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                if chunked {
                    tcp.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                        .await?;
                    tcp.write_all(&data).await?;
                    tcp.write_all(b"\r\n").await?;
                } else {
                    tcp.write_all(&data).await?;
                }
            }
            if chunked {
                tcp.write_all(b"0\r\n\r\n").await?;
            }
            Ok(())
        }
    }
}

/// Serves the rest of a connection with hyper, starting with `read`.
async fn handoff(front: Front, tcp: TcpStream, read: Bytes, closing: Shutdown) {
    let io = hyper_util::rt::TokioIo::new(Rewind { read, tcp });
    let cors = front.cors.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let front = front.clone();
        async move { Ok::<_, Infallible>(front.handle(req).await) }
    });
    match cors {
        Some(layer) => serve_hyper(io, tower::Layer::layer(&layer, svc), closing).await,
        None => serve_hyper(io, svc, closing).await,
    }
}

async fn serve_hyper<S>(io: hyper_util::rt::TokioIo<Rewind>, svc: S, closing: Shutdown)
where
    S: tower::Service<Request<Incoming>, Response = GatewayResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    // Heads beyond 64 KiB get a 431 (hyper's default would allow ~400 KiB).
    http.timer(hyper_util::rt::TokioTimer::new())
        .max_header_size(64 * 1024);
    let conn = http.serve_connection(io, hyper_util::service::TowerToHyperService::new(svc));
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = closing.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A connection with bytes already read from it put back in front.
struct Rewind {
    read: Bytes,
    tcp: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
