//! HTTP/1.1 through the gateway's own path and the hand-over to hyper:
//! exact bytes in from clients, exact bytes out from upstreams.

use std::{sync::Arc, time::Duration};

use restaurant_gateway::{Config, Upstreams};
use restaurant_platform::shutdown::Shutdown;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One request as a raw upstream saw it.
#[derive(Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn method_and_target(&self) -> &str {
        let line = self.head.lines().next().unwrap_or_default();
        line.rsplit_once(' ').map_or(line, |(mt, _)| mt)
    }
}

/// What a raw upstream answers: the bytes, and whether to close after.
type Answer = (Vec<u8>, bool);

/// An upstream speaking HTTP/1.1 by hand, so a test controls every byte.
async fn raw_upstream(answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_head(&mut sock, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let length = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
                    while buf.len() < end + length {
                        if read_more(&mut sock, &mut buf).await == 0 {
                            return;
                        }
                    }
                    let body = buf[end..end + length].to_vec();
                    buf.drain(..end + length);
                    let (bytes, close) = answer(&Seen { head, body });
                    if sock.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    url
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 8192];
    let n = sock.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// Reads until a head is complete; its length, or `None` at the end.
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        if read_more(sock, buf).await == 0 {
            return None;
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A 200 answer carrying `body` in chunks of `piece` bytes.
fn chunked_answer(body: &[u8], piece: usize) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for part in body.chunks(piece) {
        r.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        r.extend_from_slice(part);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn gateway_to(url: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        health_interval: Duration::from_secs(3600),
        ..Config::new(Upstreams::single(
            url.clone(),
            url.clone(),
            url.clone(),
            url,
        ))
    };
    let gw = restaurant_gateway::start(l, config, Shutdown::new()).unwrap();
    let url = gw.url();
    std::mem::forget(gw);
    url
}

/// A client's responses, read off one connection: status line, headers,
/// body (by content length or chunked), for `n` responses.
async fn responses(sock: &mut TcpStream, n: usize) -> Vec<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let end = read_head(sock, &mut buf).await.expect("a response head");
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let status = head[9..12].parse().unwrap();
        let body = if let Some(len) = header(&head, "content-length") {
            let len: usize = len.parse().unwrap();
            while buf.len() < len {
                assert!(read_more(sock, &mut buf).await > 0, "body cut short");
            }
            buf.drain(..len).collect()
        } else if header(&head, "transfer-encoding").is_some() {
            let mut body = Vec::new();
            loop {
                while !buf.windows(2).any(|w| w == b"\r\n") {
                    assert!(read_more(sock, &mut buf).await > 0);
                }
                let i = buf.windows(2).position(|w| w == b"\r\n").unwrap();
                let size =
                    usize::from_str_radix(std::str::from_utf8(&buf[..i]).unwrap(), 16).unwrap();
                buf.drain(..i + 2);
                while buf.len() < size + 2 {
                    assert!(read_more(sock, &mut buf).await > 0);
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break body;
                }
            }
        } else {
            Vec::new()
        };
        out.push((status, head, body));
    }
    out
}

#[tokio::test]
async fn answers_of_every_framing_reach_the_client_whole() {
    let big: Arc<Vec<u8>> = Arc::new((0..1_000_000u32).map(|i| (i % 251) as u8).collect());
    let big2 = big.clone();
    let up = raw_upstream(move |seen| {
        let target = seen.method_and_target().to_owned();
        let bytes = match target.as_str() {
            "GET /orders/length" => ok("by length"),
            "GET /orders/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nby \r\n7\r\nchunks!\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
            "GET /orders/close" => return (b"HTTP/1.0 200 OK\r\n\r\nuntil the end".to_vec(), true),
            "GET /orders/interim" => b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal".to_vec(),
            "HEAD /orders/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 12345\r\n\r\n".to_vec(),
            "GET /orders/none" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "GET /orders/big" => {
                let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big2.len()).into_bytes();
                r.extend_from_slice(&big2);
                r
            }
            "GET /orders/bigchunked" => {
                chunked_answer(&big2, 100_000)
            }
            other => panic!("unexpected {other}"),
        };
        (bytes, false)
    })
    .await;
    let gw = gateway_to(up).await;
    let c = reqwest::Client::new();
    let get = |path: &'static str| {
        let c = c.clone();
        let gw = gw.clone();
        async move {
            let res = c.get(format!("{gw}{path}")).send().await.unwrap();
            let status = res.status().as_u16();
            let rid = res.headers().contains_key("x-request-id");
            (status, rid, res.bytes().await.unwrap().to_vec())
        }
    };
    assert_eq!(
        get("/orders/length").await,
        (200, true, b"by length".to_vec())
    );
    assert_eq!(
        get("/orders/chunked").await,
        (200, true, b"by chunks!".to_vec())
    );
    assert_eq!(
        get("/orders/close").await,
        (200, true, b"until the end".to_vec())
    );
    assert_eq!(get("/orders/interim").await, (200, true, b"final".to_vec()));
    assert_eq!(get("/orders/none").await, (204, true, Vec::new()));
    let (status, _, body) = get("/orders/big").await;
    assert_eq!((status, body.len()), (200, big.len()));
    assert!(body == *big, "a streamed body arrives intact");
    let (status, _, body) = get("/orders/bigchunked").await;
    assert_eq!((status, body.len()), (200, big.len()));
    assert!(body == *big, "a streamed chunked body arrives intact");
    let head = c.head(format!("{gw}/orders/head")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        "12345",
        "HEAD keeps the resource's length"
    );
}

#[tokio::test]
async fn one_connection_mixes_the_fast_path_and_hyper_in_order() {
    let up = raw_upstream(|seen| {
        let text = format!(
            "{} body={}",
            seen.method_and_target(),
            String::from_utf8_lossy(&seen.body)
        );
        (ok(&text), false)
    })
    .await;
    let gw = gateway_to(up).await;
    let mut sock = TcpStream::connect(gw.trim_start_matches("http://"))
        .await
        .unwrap();
    // Pipelined, all at once: a proxied GET, the gateway's own endpoint, a
    // POST with a chunked body and one with a length (both after the hand
    // over to hyper), then HTTP/1.0 asking to close.
    let requests = concat!(
        "GET /orders/1?x=y HTTP/1.1\r\nhost: a\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n",
        "POST /orders HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        "POST /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nxyz",
        "GET /mypages/2 HTTP/1.0\r\n\r\n",
    );
    sock.write_all(requests.as_bytes()).await.unwrap();
    let got = responses(&mut sock, 5).await;
    let bodies: Vec<(u16, String)> = got
        .iter()
        .map(|(s, _, b)| (*s, String::from_utf8_lossy(b).into_owned()))
        .collect();
    assert_eq!(bodies[0], (200, "GET /orders/1?x=y body=".into()));
    assert_eq!(bodies[1].0, 200);
    assert!(bodies[1].1.contains("ok"), "{:?}", bodies[1]);
    assert_eq!(bodies[2], (200, "POST /orders body=abcd".into()));
    assert_eq!(bodies[3], (200, "POST /orders body=xyz".into()));
    assert_eq!(bodies[4], (200, "GET /mypages/2 body=".into()));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest))
        .await
        .expect("HTTP/1.0 without keep-alive: closed after the answer")
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_kept_alive_client_is_served_on_one_upstream_connection() {
    let up = raw_upstream(|seen| (ok(seen.method_and_target()), false)).await;
    let gw = gateway_to(up.clone()).await;
    let mut sock = TcpStream::connect(gw.trim_start_matches("http://"))
        .await
        .unwrap();
    for i in 0..200 {
        let req = format!("GET /orders/{i} HTTP/1.1\r\nhost: a\r\nx-request-id: r{i}\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        let (status, head, body) = responses(&mut sock, 1).await.remove(0);
        assert_eq!(
            (status, body),
            (200, format!("GET /orders/{i}").into_bytes())
        );
        assert_eq!(
            header(&head, "x-request-id"),
            Some(format!("r{i}").as_str())
        );
    }
    let metrics = reqwest::get(format!("{gw}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let connects: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_upstream_connects_total")
                && l.contains(&up)
                && l.contains("upstream=\"order\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("a connect counter for the replica");
    assert_eq!(connects, 1.0, "200 requests, one upstream connection");
}

#[tokio::test]
async fn replicas_that_close_connections_do_not_fail_requests() {
    // One says it closes; the other closes without a word after every answer.
    let says = raw_upstream(|seen| {
        let mut r = ok(seen.method_and_target());
        r.splice(17..17, b"connection: close\r\n".iter().copied());
        (r, true)
    })
    .await;
    let silent = raw_upstream(|seen| (ok(seen.method_and_target()), true)).await;
    let gw = gateway_to(says.clone()).await;
    let c = reqwest::Client::new();
    for i in 0..30 {
        let res = c
            .post(format!("{gw}/orders/{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "POST {i} to a replica that says close");
        assert_eq!(res.text().await.unwrap(), format!("POST /orders/{i}"));
    }
    let gw = gateway_to(silent).await;
    for i in 0..30 {
        let res = c.get(format!("{gw}/orders/{i}")).send().await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "GET {i} to a replica that closes silently"
        );
        assert_eq!(res.text().await.unwrap(), format!("GET /orders/{i}"));
    }
}

#[tokio::test]
async fn malformed_or_abandoned_requests_get_an_answer_or_a_close_never_a_crash() {
    let up = raw_upstream(|seen| (ok(seen.method_and_target()), false)).await;
    let gw = gateway_to(up).await;
    let addr = gw.trim_start_matches("http://").to_owned();
    let send = |bytes: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            sock.write_all(&bytes).await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        }
    };
    let bad = send(b"GARBAGE\r\n\r\n".to_vec()).await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let mut huge = b"GET /orders HTTP/1.1\r\nx-big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100_000));
    huge.extend_from_slice(b"\r\n\r\n");
    let too_large = send(huge).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");
    let smuggle = send(
        b"POST /orders HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd".to_vec(),
    )
    .await;
    assert!(
        smuggle.starts_with("HTTP/1.1 400"),
        "two lengths: {smuggle}"
    );
    // A client that sends half a request and leaves.
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"POST /orders HTTP/1.1\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .unwrap();
    drop(half);
    let fine = reqwest::get(format!("{gw}/orders/after")).await.unwrap();
    assert_eq!(fine.status(), 200);
    assert_eq!(fine.text().await.unwrap(), "GET /orders/after");
}

#[tokio::test]
async fn large_and_malformed_answers_are_handled_on_hyper_s_path_too() {
    let big: Arc<Vec<u8>> = Arc::new((0..600_000u32).map(|i| (i % 253) as u8).collect());
    let big2 = big.clone();
    let up = raw_upstream(move |seen| {
        let bytes = match seen.method_and_target() {
            "GET /orders/big" => chunked_answer(&big2, 70_000),
            // Two different lengths: a smuggling shape, never passed on.
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec(),
        };
        (bytes, false)
    })
    .await;
    let gw = gateway_to(up).await;
    let addr = gw.trim_start_matches("http://").to_owned();
    // HTTP/1.0 goes to hyper; the answer streams through and the
    // connection closes at its end.
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    sock.write_all(b"GET /orders/big HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.0 200") || got.starts_with(b"HTTP/1.1 200"));
    assert!(got[end..] == big[..], "streamed whole through hyper");
    // A malformed answer is a 502 problem on both paths.
    let own = reqwest::get(format!("{gw}/orders/bad")).await.unwrap();
    assert_eq!(own.status(), 502);
    assert_eq!(own.headers()["content-type"], "application/problem+json");
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    sock.write_all(b"GET /orders/bad HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains(" 502 "), "{text}");
}
