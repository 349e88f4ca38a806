//! Keep-alive HTTP/1.1 connections to one replica, driven by the request
//! that uses them.
//!
//! A general-purpose client (hyper-util's) runs every connection in a task
//! of its own and hands each request to it over a channel, then spawns one
//! more task per request to put the connection back in its pool: three tasks
//! and their wake-ups for every proxied request. Here the request's own task
//! polls the connection while it writes the request and reads the answer,
//! and puts it back in the replica's idle list when the answer has been read
//! whole. Answers up to [`BUFFERED`] bytes are read whole before they are
//! passed on (as nginx buffers them); a larger one is streamed, its
//! connection then driven by a task of its own and not reused.
use std::{
    future::{Future, poll_fn},
    io,
    pin::{Pin, pin},
    sync::Mutex,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request as sent upstream: its body was read whole beforehand, so a
/// request that could not be delivered can go to another replica.
pub(crate) type UpstreamBody = Full<Bytes>;

/// Answers up to this size are read whole, in the request's task; larger
/// ones are streamed.
pub(crate) const BUFFERED: usize = 256 * 1024;
/// Idle connections kept per replica.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the
/// replica (or a NAT between) may have forgotten it.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

type Connection = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

struct Conn {
    sender: http1::SendRequest<UpstreamBody>,
    conn: Connection,
    /// The connection future finished: the connection is closed.
    closed: bool,
    idle_since: Instant,
}

impl Conn {
    /// Lets the connection read and write what it can.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.closed && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.closed = true;
        }
    }

    /// Ready for another request now (not after waiting).
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx);
        !self.closed && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The exchange failed after the request may have been sent.
    Exchange(hyper::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Exchange(e) => write!(f, "{e}"),
        }
    }
}

/// One replica's address and its idle connections.
pub(crate) struct Upstream {
    /// `host:port`, as connected to.
    authority: String,
    /// The `Host` header sent to it.
    host: HeaderValue,
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
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Upstream {
            authority: format!("{}:{port}", authority.host()),
            host,
            idle: Mutex::new(Vec::new()),
            connects: metrics::counter!("gateway_upstream_connects_total",
                "upstream" => service, "replica" => base.to_owned()),
        })
    }

    /// Sends `req` (origin-form target) and reads the answer.
    pub(crate) async fn exchange(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<ProxyBody>, Failure> {
        req.headers_mut()
            .insert(http::header::HOST, self.host.clone());
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(c) => (c, true),
                None => (self.connect().await.map_err(Failure::Connect)?, false),
            };
            let mut sent = pin!(conn.sender.try_send_request(req));
            let res = poll_fn(|cx| {
                // The connection first, so it picks up the request at once.
                if !conn.closed && Pin::new(&mut conn.conn).poll(cx).is_ready() {
                    conn.closed = true;
                }
                sent.as_mut().poll(cx)
            })
            .await;
            let res = match res {
                Ok(res) => res,
                Err(mut e) => match e.take_message() {
                    // A kept-alive connection the replica had closed: the
                    // request was not written, so it goes on a fresh one.
                    Some(unsent) if reused => {
                        req = unsent;
                        continue;
                    }
                    _ => return Err(Failure::Exchange(e.into_error())),
                },
            };
            let (parts, mut body) = res.into_parts();
            return match read(&mut conn, &mut body)
                .await
                .map_err(Failure::Exchange)?
            {
                Read::Whole(bytes) => {
                    self.checkin(conn).await;
                    Ok(Response::from_parts(
                        parts,
                        ProxyBody::Full(Full::new(bytes)),
                    ))
                }
                Read::Partly(head) => {
                    // Too large to hold: stream the rest, the connection
                    // driven by a task of its own until the answer ends.
                    let Conn { conn, closed, .. } = conn;
                    if !closed {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    Ok(Response::from_parts(
                        parts,
                        ProxyBody::Streamed {
                            head: Some(head),
                            rest: body,
                        },
                    ))
                }
            };
        }
    }

    /// An idle connection that is still open and ready, if there is one.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.idle_since.elapsed() < IDLE_TIMEOUT
                && poll_fn(|cx| Poll::Ready(conn.ready(cx))).await
            {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection whose exchange is over, if it can take another.
    async fn checkin(&self, mut conn: Conn) {
        // The answer was read whole, so the connection is ready for the
        // next request as soon as it is polled once more; one that is not
        // (the replica said `Connection: close`) is dropped.
        if !poll_fn(|cx| Poll::Ready(conn.ready(cx))).await {
            return;
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(io::Error::other)?;
        Ok(Conn {
            sender,
            conn,
            closed: false,
            idle_since: Instant::now(),
        })
    }
}

enum Read {
    Whole(Bytes),
    /// The first [`BUFFERED`] bytes or more; the rest is still to come.
    Partly(Bytes),
}

/// Reads an answer's body, driving its connection, up to [`BUFFERED`] bytes.
async fn read(conn: &mut Conn, body: &mut Incoming) -> Result<Read, hyper::Error> {
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    poll_fn(|cx| {
        loop {
            if body.is_end_stream() {
                break;
            }
            conn.drive(cx);
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: not forwarded
                    };
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
                        return Poll::Ready(Ok(false));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(true))
    })
    .await
    .map(|whole| {
        let bytes = if more.is_empty() {
            first.unwrap_or_default()
        } else {
            more.freeze()
        };
        if whole {
            Read::Whole(bytes)
        } else {
            Read::Partly(bytes)
        }
    })
}

/// A proxied answer's body: read whole, or streamed when it was too large
/// to hold.
pub(crate) enum ProxyBody {
    Full(Full<Bytes>),
    Streamed { head: Option<Bytes>, rest: Incoming },
}

impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::Full(Full::default())
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full(Full::new(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(full) => Pin::new(full).poll_frame(cx).map_err(|e| match e {}),
            ProxyBody::Streamed { head, rest } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(full) => full.is_end_stream(),
            ProxyBody::Streamed { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(full) => full.size_hint(),
            ProxyBody::Streamed { head, rest } => {
                let mut hint = rest.size_hint();
                let h = head.as_ref().map_or(0, |h| h.len() as u64);
                hint.set_lower(hint.lower() + h);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + h);
                }
                hint
            }
        }
    }
}
