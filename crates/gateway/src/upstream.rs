//! Keep-alive HTTP/1.1 connections to one replica, used by the request's
//! own task.
//!
//! A general-purpose client (hyper-util's) runs every connection in a task
//! of its own, hands each request to it over a channel and spawns one more
//! task per request to put the connection back in its pool; its requests and
//! answers are header maps. Here the request's task writes the request
//! bytes, reads the answer's head and body, and puts the connection back in
//! the replica's idle list: no channel, no other task, no header map.
//! Answers up to [`BUFFERED`] bytes are read whole before they are passed on
//! (as nginx buffers them); a larger one is streamed from the connection,
//! which is then not reused.
use std::{
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::Uri;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use crate::h1::{self, Framing, Malformed, ResponseHead, Step};

/// Answers up to this size are read whole; larger ones are streamed.
pub(crate) const BUFFERED: usize = 256 * 1024;
/// Idle connections kept per replica.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the
/// replica (or a NAT between) may have forgotten it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 8 * 1024;

struct Conn {
    tcp: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    idle_since: Instant,
}

impl Conn {
    /// Reads more; `false` at the end of the connection.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(READ_CHUNK);
        Ok(tokio::io::AsyncReadExt::read_buf(&mut self.tcp, &mut self.buf).await? > 0)
    }

    /// Still open, and nothing unasked-for arrived while it was idle.
    /// Costs no system call unless the socket became readable meanwhile.
    async fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let readable = poll_fn(|cx| Poll::Ready(self.tcp.poll_read_ready(cx).is_ready())).await;
        if !readable {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A request to forward: everything but its `Host` line, which names the
/// replica it goes to.
pub(crate) struct Outgoing {
    pub method: http::Method,
    /// Origin-form target: path and query.
    pub target: Bytes,
    /// Header lines (`name: value\r\n`), hop-by-hop and `Host` left out.
    pub lines: Vec<u8>,
    pub body: Bytes,
}

impl Outgoing {
    fn write(&self, host: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        h1::put_header(out, b"host", host);
        out.extend_from_slice(&self.lines);
        let has_body = matches!(
            self.method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        );
        if has_body || !self.body.is_empty() {
            h1::put_length(out, self.body.len() as u64);
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
    }
}

/// An upstream's answer.
pub(crate) struct Answer {
    pub head: ResponseHead,
    pub body: AnswerBody,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The exchange failed after the request may have been sent.
    Io(io::Error),
    /// The answer was not HTTP this gateway can pass on.
    Malformed(Malformed),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Malformed(m) => write!(f, "{m}"),
        }
    }
}

/// One replica's address and its idle connections.
pub(crate) struct Upstream {
    /// `host:port`, as connected to.
    authority: String,
    /// The `Host` header sent to it.
    host: Bytes,
    idle: Mutex<Vec<Conn>>,
    connects: metrics::Counter,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A replica at `base` (`http://host[:port]`), or why it cannot be one.
    pub(crate) fn new(base: &str, service: &'static str) -> Result<Self, String> {
        let uri: Uri = base.parse().map_err(|e| format!("{base}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{base}: only http:// upstreams are supported"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!("{base}: a replica is a scheme, host and port only"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{base}: no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Upstream {
            authority: format!("{}:{port}", authority.host()),
            host: Bytes::copy_from_slice(authority.as_str().as_bytes()),
            idle: Mutex::new(Vec::new()),
            connects: metrics::counter!("gateway_upstream_connects_total",
                "upstream" => service, "replica" => base.to_owned()),
        })
    }

    /// Sends `req` and reads the answer.
    pub(crate) async fn exchange(&self, req: &Outgoing) -> Result<Answer, Failure> {
        let mut out = Vec::with_capacity(256 + req.lines.len() + req.body.len());
        req.write(&self.host, &mut out);
        let head_request = req.method == http::Method::HEAD;
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(c) => (c, true),
                None => (self.connect().await.map_err(Failure::Connect)?, false),
            };
            let head = match send(&mut conn, &out, head_request).await {
                Ok(head) => head,
                // A kept-alive connection the replica closed as we wrote:
                // it answered nothing. Safe to repeat on a fresh connection
                // only if the request is (a replica may have acted on it).
                Err(Failure::Io(e))
                    if reused && nothing_answered(&e) && idempotent(&req.method) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            return self.read_answer(conn, head).await;
        }
    }

    async fn read_answer(&self, mut conn: Conn, mut head: ResponseHead) -> Result<Answer, Failure> {
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        let mut eof = false;
        loop {
            match head
                .framing
                .step(&mut conn.buf, eof)
                .map_err(Failure::Malformed)?
            {
                Step::Data(data) => {
                    match &first {
                        None => first = Some(data),
                        Some(f) => {
                            if more.is_empty() {
                                more.extend_from_slice(f);
                            }
                            more.extend_from_slice(&data);
                        }
                    }
                    let held = if more.is_empty() {
                        first.as_ref().map_or(0, Bytes::len)
                    } else {
                        more.len()
                    };
                    if held > BUFFERED {
                        let held = if more.is_empty() {
                            first.unwrap_or_default()
                        } else {
                            more.freeze()
                        };
                        let framing = std::mem::replace(&mut head.framing, Framing::Length(0));
                        return Ok(Answer {
                            head,
                            body: AnswerBody::Streamed(Streamed {
                                held: Some(held),
                                conn,
                                framing,
                                eof: false,
                                stall: Box::pin(tokio::time::sleep(STREAM_STALL)),
                            }),
                        });
                    }
                }
                Step::More => eof = !conn.fill().await.map_err(Failure::Io)?,
                Step::End => break,
            }
        }
        let body = if more.is_empty() {
            first.unwrap_or_default()
        } else {
            more.freeze()
        };
        if head.keep_alive {
            self.checkin(conn);
        }
        Ok(Answer {
            head,
            body: AnswerBody::Whole(body),
        })
    }

    /// An idle connection that is still open, if there is one.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.idle_since.elapsed() < IDLE_TIMEOUT && conn.still_open().await {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection whose exchange is over.
    fn checkin(&self, mut conn: Conn) {
        if !conn.buf.is_empty() {
            return; // more than the answer arrived: not HTTP we trust
        }
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Closes idle connections past [`IDLE_TIMEOUT`].
    pub(crate) fn expire_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
    }

    async fn connect(&self) -> io::Result<Conn> {
        self.connects.increment(1);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.authority))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        // Requests are written whole; Nagle would only delay their last
        // segment until the replica's delayed ACK.
        tcp.set_nodelay(true)?;
        Ok(Conn {
            tcp,
            buf: BytesMut::with_capacity(READ_CHUNK),
            idle_since: Instant::now(),
        })
    }
}

/// Idempotent methods (RFC 9110 §9.2.2): safe to send again.
pub(crate) fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// The replica closed the connection without a byte of answer.
fn nothing_answered(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Writes a request and reads its answer's head.
async fn send(conn: &mut Conn, out: &[u8], head_request: bool) -> Result<ResponseHead, Failure> {
    conn.tcp.write_all(out).await.map_err(Failure::Io)?;
    loop {
        if let Some(head) =
            h1::parse_response(&mut conn.buf, head_request).map_err(Failure::Malformed)?
        {
            return Ok(head);
        }
        if !conn.fill().await.map_err(Failure::Io)? {
            let e = if conn.buf.is_empty() {
                io::ErrorKind::UnexpectedEof.into()
            } else {
                io::Error::other("the answer's head was cut short")
            };
            return Err(Failure::Io(e));
        }
    }
}

/// An answer's body.
pub(crate) enum AnswerBody {
    Whole(Bytes),
    Streamed(Streamed),
}

/// The rest of an answer too large to hold, read from its connection as it
/// is passed on.
pub(crate) struct Streamed {
    held: Option<Bytes>,
    conn: Conn,
    framing: Framing,
    eof: bool,
    /// When the replica is given up on if it sends nothing more: a stalled
    /// stream must not hold the client's connection for ever.
    stall: Pin<Box<tokio::time::Sleep>>,
}

/// How long a streamed answer may pause.
const STREAM_STALL: Duration = Duration::from_secs(30);

impl Streamed {
    /// The whole body's length, if the head said.
    pub(crate) fn len(&self) -> Option<u64> {
        let held = self.held.as_ref().map_or(0, |h| h.len() as u64);
        self.framing.len().map(|n| n + held)
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(held) = this.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(held))));
        }
        loop {
            match this.framing.step(&mut this.conn.buf, this.eof) {
                Err(m) => return Poll::Ready(Some(Err(io::Error::other(m.to_string())))),
                Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {
                    // The rare path (answers over BUFFERED): a copy through
                    // a stack buffer keeps it free of unsafe code.
                    let mut chunk = [0u8; READ_CHUNK];
                    let mut read = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.conn.tcp).poll_read(cx, &mut read) {
                        Poll::Pending => {
                            if this.stall.as_mut().poll(cx).is_ready() {
                                let e = io::Error::new(io::ErrorKind::TimedOut, "upstream stalled");
                                return Poll::Ready(Some(Err(e)));
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                        Poll::Ready(Ok(())) => {
                            this.eof = read.filled().is_empty();
                            this.conn.buf.extend_from_slice(read.filled());
                            let next = tokio::time::Instant::now() + STREAM_STALL;
                            this.stall.as_mut().reset(next);
                        }
                    }
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.len() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
