//! Slow and oversized clients against the real server, over raw TCP: silent
//! or trickling clients are disconnected, a body that never ends is answered
//! 408 and closed, oversized headers 431 — while replies slower than every
//! one of these deadlines still complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::server::{RunningServer, call, cli_token, config};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

/// How long a test waits for the server to close a connection before it
/// fails: many times the one-second deadlines these servers are given.
const GUARD: Duration = Duration::from_secs(15);
/// Between two bytes of a trickling client.
const TRICKLE: Duration = Duration::from_millis(100);

/// A server whose header, idle and body deadlines are one second (unless
/// `extra` sets them), on a paced simulated model whose replies take
/// about 2.5 s.
async fn server(extra: &[&str]) -> (RunningServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let defaults = [
        ("--jwt-secret", "connections-test-secret"),
        ("--initial-credits", "100"),
        ("--header-read-timeout-seconds", "1"),
        ("--idle-connection-timeout-seconds", "1"),
        ("--body-read-timeout-seconds", "1"),
        ("--simulated-first-token-millis", "0"),
        ("--simulated-tokens-per-second", "10"),
        ("--simulated-reply-tokens", "25"),
    ];
    let mut flags = extra.to_vec();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            flags.extend([flag, value]);
        }
    }
    let config = config(dir.path(), &flags);
    let token = cli_token(&config, "alice").await;
    (RunningServer::start(config).await, token, dir)
}

/// Reads until the server closes the connection; fails after [`GUARD`].
/// Returns what was read before the close.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(GUARD, read)
        .await
        .expect("the server kept the connection open");
    received
}

/// Writes `bytes` one at a time, [`TRICKLE`] apart, then keeps the
/// connection open without writing; returns how many bytes it got out
/// before the server closed the connection.
async fn trickle(mut writer: OwnedWriteHalf, bytes: Vec<u8>) -> usize {
    let mut interval = tokio::time::interval(TRICKLE);
    for (sent, byte) in bytes.iter().enumerate() {
        interval.tick().await;
        if writer.write_all(&[*byte]).await.is_err() {
            return sent;
        }
    }
    std::future::pending().await
}

/// One response read from a kept-alive connection (the server's answers
/// here all have a Content-Length); fails after [`GUARD`].
async fn read_response(stream: &mut TcpStream) -> (u16, String, Value) {
    tokio::time::timeout(GUARD, read_response_unguarded(stream))
        .await
        .expect("no response")
}

async fn read_response_unguarded(stream: &mut TcpStream) -> (u16, String, Value) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed early");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (
        status,
        head,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: parley\r\n\r\n")
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_disconnected() {
    let (server, _, _dir) = server(&["--idle-connection-timeout-seconds", "600"]).await;
    let mut silent = TcpStream::connect(server.address).await.unwrap();
    let received = read_until_closed(&mut silent).await;
    assert!(received.is_empty(), "{received:?}");
    // The server still serves everyone else.
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn headers_trickled_byte_by_byte_are_cut() {
    let (server, _, _dir) = server(&["--idle-connection-timeout-seconds", "600"]).await;
    let stream = TcpStream::connect(server.address).await.unwrap();
    let (mut reader, writer) = stream.into_split();
    // Far more bytes than fit in the header deadline at this pace.
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: parley\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(600)
    );
    let sender = tokio::spawn(trickle(writer, request.clone().into_bytes()));
    let received = read_until_closed(&mut reader).await;
    let sent = sender.await.unwrap();
    assert!(sent < request.len(), "the whole request got through");
    assert!(
        !String::from_utf8_lossy(&received).contains("200 OK"),
        "the trickled request was answered"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_serves_a_prompt_request_then_closes_when_idle() {
    let (server, _, _dir) = server(&[]).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    for _ in 0..2 {
        stream.write_all(get("/health").as_bytes()).await.unwrap();
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!((status, body), (200, json!({"status": "ok"})));
    }
    let received = read_until_closed(&mut stream).await;
    assert!(received.is_empty(), "{received:?}");
    server.stop().await;
}

/// An idle kept-alive connection may wait long, but once a request starts
/// its headers have the (shorter) header deadline.
#[tokio::test]
async fn a_request_started_on_a_kept_alive_connection_has_the_header_deadline() {
    let (server, _, _dir) = server(&["--idle-connection-timeout-seconds", "600"]).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(get("/health").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let received = read_until_closed(&mut stream).await;
    assert!(received.is_empty(), "{received:?}");
    server.stop().await;
}

/// Replies of about 2.5 s, with no byte on the wire for all that time in
/// the whole-reply case, outlast every one-second deadline and complete.
#[tokio::test]
async fn replies_slower_than_every_deadline_complete() {
    let (server, token, _dir) = server(&[]).await;
    let (status, created) = call(
        reqwest::Method::POST,
        server.url("/api/chat/sessions"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["sessionId"].as_str().unwrap();

    let response = reqwest::Client::new()
        .post(server.url(&format!("/api/chat/sessions/{id}/stream")))
        .bearer_auth(&token)
        .json(&json!({"message": "tell me a long story"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    let mut chunks = 0;
    let mut last = String::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        chunks += usize::from(event.event == "chunk");
        last = event.event;
    }
    assert_eq!(last, "complete");
    assert_eq!(chunks, 25);

    let (status, reply) = call(
        reqwest::Method::POST,
        server.url(&format!("/api/chat/sessions/{id}/messages")),
        &token,
        Some(json!({"message": "and another"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["usage"]["outputTokens"], 25);
    server.stop().await;
}

fn chunked_post(path: &str, token: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: parley\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
}

#[tokio::test]
async fn a_chunked_body_that_never_ends_is_answered_408_and_closed() {
    let (server, token, _dir) = server(&[]).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let request = chunked_post("/api/chat/sessions", &token) + "5\r\n{\"tit\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 408, "{head}{body}");
    assert_eq!(body["code"], "REQUEST_TIMEOUT");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let after = read_until_closed(&mut stream).await;
    assert!(after.is_empty(), "{after:?}");
    server.stop().await;
}

/// The body deadline is for the whole body: a client that keeps sending a
/// byte at a time does not keep it open, and while it trickles it holds no
/// reply slot (one stream at a time here), so its user's other reply runs.
#[tokio::test]
async fn a_trickled_body_is_answered_408_without_holding_a_reply_slot() {
    let (server, token, _dir) = server(&["--rate-limit-concurrent-streams", "1"]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, created) = call(
            reqwest::Method::POST,
            server.url("/api/chat/sessions"),
            &token,
            Some(json!({})),
        )
        .await;
        ids.push(created["sessionId"].as_str().unwrap().to_owned());
    }
    let stream = TcpStream::connect(server.address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let path = format!("/api/chat/sessions/{}/stream", ids[0]);
    writer
        .write_all(chunked_post(&path, &token).as_bytes())
        .await
        .unwrap();
    // One-byte chunks, each a complete chunk, so data keeps arriving.
    let body = "{\"message\": \"hello there, slowly\"}";
    let chunks: Vec<u8> = body
        .bytes()
        .flat_map(|byte| {
            let mut chunk = b"1\r\n".to_vec();
            chunk.push(byte);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect();
    let sender = tokio::spawn(async move {
        let mut interval = tokio::time::interval(TRICKLE);
        for piece in chunks.chunks(6) {
            interval.tick().await;
            if writer.write_all(piece).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });

    let (status, reply) = call(
        reqwest::Method::POST,
        server.url(&format!("/api/chat/sessions/{}/messages", ids[1])),
        &token,
        Some(json!({"message": "meanwhile"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");

    let received = String::from_utf8(read_until_closed(&mut reader).await).unwrap();
    assert!(received.starts_with("HTTP/1.1 408"), "{received}");
    assert!(received.contains("REQUEST_TIMEOUT"), "{received}");
    sender.abort();
    server.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_answered_431_and_closed() {
    let (server, _, _dir) = server(&["--max-header-bytes", "16384"]).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let fits = format!(
        "GET /health HTTP/1.1\r\nHost: parley\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    stream.write_all(fits.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);

    let too_large = format!(
        "GET /health HTTP/1.1\r\nHost: parley\r\nAuthorization: Bearer {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // The server may close before taking every byte.
    let _ = stream.write_all(too_large.as_bytes()).await;
    let received = String::from_utf8(read_until_closed(&mut stream).await).unwrap();
    assert!(received.starts_with("HTTP/1.1 431"), "{received}");
    server.stop().await;
}

/// Open streams per connection: one. The service speaks HTTP/1.1 only, so
/// stream requests pipelined on one connection run one after the other —
/// with one concurrent stream allowed per user, both are 200 (had the
/// second started during the first, it would be 429) and the second answer
/// begins after the first reply's end.
#[tokio::test]
async fn one_connection_carries_one_stream_at_a_time() {
    let (server, token, _dir) = server(&["--rate-limit-concurrent-streams", "1"]).await;
    let mut pipelined = String::new();
    for _ in 0..2 {
        let (status, created) = call(
            reqwest::Method::POST,
            server.url("/api/chat/sessions"),
            &token,
            Some(json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let body = json!({"message": "go"}).to_string();
        pipelined.push_str(&format!(
            "POST /api/chat/sessions/{}/stream HTTP/1.1\r\nHost: parley\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            created["sessionId"].as_str().unwrap(),
            body.len()
        ));
    }
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    // Both replies, then the idle deadline closes the connection.
    let received = String::from_utf8(read_until_closed(&mut stream).await).unwrap();
    let answers: Vec<&str> = received.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "{received}");
    for answer in &answers {
        assert!(answer.starts_with("200"), "{answer}");
        assert!(answer.contains("text/event-stream"), "{answer}");
        assert!(answer.contains("event: complete"), "{answer}");
        assert!(
            answer.ends_with("0\r\n\r\n"),
            "the reply's body ended: {answer}"
        );
    }
    server.stop().await;
}

/// HTTP/2 is not spoken: a client that opens with the HTTP/2 preface (to
/// multiplex streams on one connection) gets no HTTP/2 frames, only an
/// HTTP/1.1 error or a close, and the server keeps serving.
#[tokio::test]
async fn an_http2_preface_opens_no_streams() {
    let (server, _token, _dir) = server(&[]).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    // The preface, then an empty SETTINGS frame.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&preface).await.unwrap();
    let received = read_until_closed(&mut stream).await;
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    let (status, _) = call(reqwest::Method::GET, server.url("/health"), "", None).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}
