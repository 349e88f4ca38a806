//! The parts of HTTP/1.1 the gateway's own proxy path speaks: request and
//! response heads (parsed by httparse, as hyper does), message framing
//! (RFC 9112 §6), the chunked coding, and writing heads. Anything this does
//! not handle is left to hyper (see `fast`).
use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Most header lines in one head.
pub(crate) const MAX_HEADERS: usize = 64;
/// Largest head (request or response line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;

/// A header's name and value, as byte ranges of the head it came from.
pub(crate) type Field = (Range<usize>, Range<usize>);

/// Where `part`, a slice of `head` (as httparse returns them), lies in it.
pub(crate) fn range_of(head: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - head.as_ptr() as usize;
    start..start + part.len()
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a comma-separated header value lists `token`.
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A `Content-Length` value: digits only (no sign, no list).
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A response head read from an upstream.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: u16,
    /// The head's bytes; `fields` index into them.
    pub head: Bytes,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The upstream will keep the connection open after this answer.
    pub keep_alive: bool,
    /// No body follows whatever the headers say (HEAD, 204, 304): its
    /// `Content-Length` describes the resource, and is passed on as is.
    pub bodiless: bool,
}

impl ResponseHead {
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.head[n.clone()], &self.head[v.clone()]))
    }

    /// A 503 with `Retry-After`: the upstream turning work away on purpose
    /// (the order service while the bus's backlog is over its limit). It
    /// answered, so it is no failure of the replica: counted as one, three
    /// in a row would open its breaker and refuse its reads as well.
    pub fn sheds(&self) -> bool {
        self.status == 503
            && self
                .headers()
                .any(|(name, _)| name.eq_ignore_ascii_case(b"retry-after"))
    }

    /// The headers passed on to the client: not the hop-by-hop ones, nor
    /// the length, which the gateway writes for the body it sends — unless
    /// no body follows, when the length describes the resource.
    pub fn passed_on(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers().filter(|(name, _)| {
            !is_hop_by_hop(name) && (self.bodiless || !name.eq_ignore_ascii_case(b"content-length"))
        })
    }
}

/// Why a message cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    Head,
    TooLarge,
    Framing,
    Chunk,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::Head => "malformed response head",
            Malformed::TooLarge => "response head too large",
            Malformed::Framing => "ambiguous response framing",
            Malformed::Chunk => "malformed chunked body",
        })
    }
}

/// Parses a response head from the front of `buf`, taking it off. `None`:
/// more bytes are needed. Interim (1xx) responses are skipped.
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, Malformed> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        let len = match res.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(Malformed::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooLarge),
            Err(_) => return Err(Malformed::Head),
        };
        let status = res.code.ok_or(Malformed::Head)?;
        if (100..200).contains(&status) {
            if status == 101 {
                // We never ask for an upgrade.
                return Err(Malformed::Head);
            }
            let _ = buf.split_to(len);
            continue;
        }
        let http11 = res.version == Some(1);
        let mut fields = Vec::with_capacity(res.headers.len());
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut coded = false;
        let mut close = !http11;
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = content_length(h.value).ok_or(Malformed::Framing)?;
                if length.is_some_and(|m| m != n) {
                    return Err(Malformed::Framing);
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                coded = true;
                // Only a final `chunked` delimits the body (RFC 9112 §6.3).
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                if has_token(h.value, "close") {
                    close = true;
                } else if has_token(h.value, "keep-alive") {
                    close = false;
                }
            }
            fields.push((range_of(buf, name), range_of(buf, h.value)));
        }
        let bodiless = head_request || status == 204 || status == 304;
        let framing = if bodiless {
            Framing::Length(0)
        } else if coded {
            if chunked {
                Framing::Chunked(Chunked::default())
            } else {
                Framing::Close
            }
        } else {
            length.map_or(Framing::Close, Framing::Length)
        };
        let keep_alive = !close && !matches!(framing, Framing::Close);
        let head = buf.split_to(len).freeze();
        return Ok(Some(ResponseHead {
            status,
            head,
            fields,
            framing,
            keep_alive,
            bodiless,
        }));
    }
}

/// How a message body ends.
#[derive(Debug)]
pub(crate) enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// At the end of the connection.
    Close,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Default)]
pub(crate) enum Chunked {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines, then an empty line.
    Trailers,
    Done,
}

/// One step of reading a body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Data(Bytes),
    /// `buf` holds no more of it; read more (at the end of the connection,
    /// pass `eof`).
    More,
    End,
}

fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Malformed> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > max => Err(Malformed::Chunk),
        None => Ok(None),
    }
}

impl Framing {
    /// The body's next data from `buf`.
    pub(crate) fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, Malformed> {
        match self {
            Framing::Length(0) => Ok(Step::End),
            Framing::Length(n) => {
                if buf.is_empty() {
                    return if eof {
                        Err(Malformed::Framing)
                    } else {
                        Ok(Step::More)
                    };
                }
                let take = (*n).min(buf.len() as u64) as usize;
                *n -= take as u64;
                Ok(Step::Data(buf.split_to(take).freeze()))
            }
            Framing::Close => {
                if !buf.is_empty() {
                    Ok(Step::Data(buf.split().freeze()))
                } else if eof {
                    Ok(Step::End)
                } else {
                    Ok(Step::More)
                }
            }
            Framing::Chunked(state) => loop {
                let more = || {
                    if eof {
                        Err(Malformed::Chunk)
                    } else {
                        Ok(Step::More)
                    }
                };
                match state {
                    Chunked::Size => {
                        let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                            return more();
                        };
                        let digits = line[..]
                            .split(|&b| b == b';')
                            .next()
                            .unwrap_or(&[])
                            .trim_ascii();
                        if digits.is_empty() || digits.len() > 15 {
                            return Err(Malformed::Chunk);
                        }
                        let size = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                            .ok_or(Malformed::Chunk)?;
                        *state = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Chunked::Data(n) => {
                        if buf.is_empty() {
                            return more();
                        }
                        let take = (*n).min(buf.len() as u64) as usize;
                        *n -= take as u64;
                        if *n == 0 {
                            *state = Chunked::DataEnd;
                        }
                        return Ok(Step::Data(buf.split_to(take).freeze()));
                    }
                    Chunked::DataEnd => {
                        let Some(line) = take_line(buf, 2)? else {
                            return more();
                        };
                        if !line.is_empty() {
                            return Err(Malformed::Chunk);
                        }
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers => {
                        let Some(line) = take_line(buf, MAX_HEAD)? else {
                            return more();
                        };
                        if line.is_empty() {
                            *state = Chunked::Done;
                        }
                    }
                    Chunked::Done => return Ok(Step::End),
                }
            },
        }
    }

    /// The body's length, if known from the head.
    pub(crate) fn len(&self) -> Option<u64> {
        match self {
            Framing::Length(n) => Some(*n),
            _ => None,
        }
    }
}

/// Writes one header line.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a `Content-Length` line.
pub(crate) fn put_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    put_number(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Writes a decimal number.
fn put_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes a status line.
pub(crate) fn put_status(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `wire` fed in the given pieces, as a connection would.
    fn decode(mut framing: Framing, pieces: &[&[u8]]) -> Result<Vec<u8>, Malformed> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut next = pieces.iter();
        loop {
            match framing.step(&mut buf, false)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::End => return Ok(body),
                Step::More => match next.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => {
                        return match framing.step(&mut buf, true)? {
                            Step::Data(d) => {
                                body.extend_from_slice(&d);
                                Ok(body)
                            }
                            _ => Ok(body),
                        };
                    }
                },
            }
        }
    }

    fn chunked() -> Framing {
        Framing::Chunked(Chunked::default())
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert_eq!(decode(chunked(), &[wire]).unwrap(), b"hello, world");
    }

    #[test]
    fn a_broken_chunk_is_refused() {
        assert_eq!(
            decode(chunked(), &[b"zz\r\nhello\r\n"]),
            Err(Malformed::Chunk)
        );
        assert_eq!(
            decode(chunked(), &[b"5\r\nhelloXX0\r\n\r\n"]),
            Err(Malformed::Chunk)
        );
        assert_eq!(
            decode(chunked(), &[b"5\r\nhel"]),
            Err(Malformed::Chunk),
            "cut short"
        );
        assert_eq!(
            decode(Framing::Length(10), &[b"short"]),
            Err(Malformed::Framing)
        );
    }

    #[test]
    fn only_a_503_with_retry_after_is_shedding() {
        let sheds = |wire: &[u8]| {
            let mut buf = BytesMut::from(wire);
            parse_response(&mut buf, false).unwrap().unwrap().sheds()
        };
        assert!(sheds(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!sheds(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!sheds(
            b"HTTP/1.1 500 Internal Server Error\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        let parse = |wire: &[u8], head: bool| {
            let mut buf = BytesMut::from(wire);
            parse_response(&mut buf, head)
                .map(|h| h.map(|h| (h.status, h.framing.len(), h.keep_alive)))
        };
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
        assert_eq!(parse(ok, false), Ok(Some((200, Some(2), true))));
        assert_eq!(
            parse(ok, true),
            Ok(Some((200, Some(0), true))),
            "HEAD: no body"
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\ncontent-le", false), Ok(None));
        let interim = b"HTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse(interim, false), Ok(Some((204, Some(0), true))));
        let close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse(close, false), Ok(Some((200, Some(0), false))));
        let eof = b"HTTP/1.0 200 OK\r\n\r\nuntil the end";
        assert_eq!(parse(eof, false), Ok(Some((200, None, false))));
        let twice = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(
            parse(twice, false),
            Err(Malformed::Framing),
            "smuggling shape"
        );
        let signed = b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n";
        assert_eq!(parse(signed, false), Err(Malformed::Framing));
        let coded =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n";
        let mut buf = BytesMut::from(&coded[..]);
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert!(
            matches!(head.framing, Framing::Chunked(_)),
            "chunked wins over a length"
        );
        assert_eq!(head.headers().count(), 2);
    }

    proptest! {
        /// However the bytes arrive, the same body comes out.
        #[test]
        fn chunked_decoding_does_not_depend_on_how_bytes_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&wire[at..c]);
                at = c;
            }
            pieces.push(&wire[at..]);
            let body = decode(chunked(), &pieces).unwrap();
            prop_assert_eq!(body, chunks.concat());
        }
    }
}
