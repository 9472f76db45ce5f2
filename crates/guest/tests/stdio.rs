//! The agent binary's request loop over stdin/stdout (`--stdio`): ready announcement, replies
//! carrying the request id, a precise error for a bad line, and shutdown ending the loop.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use telvirt_guest::proto::{Body, Message};

#[test]
fn serves_requests_over_stdio() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_telvirt-guest"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut next = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str::<Message>(&line).unwrap()
    };
    let ready = next();
    assert_eq!(ready.id, None);
    assert!(matches!(ready.body, Body::Ready(_)));

    writeln!(input, r#"{{"id":7,"op":"health"}}"#).unwrap();
    let h = next();
    assert_eq!(h.id, Some(7));
    assert!(matches!(h.body, Body::Health(_)), "{h:?}");

    writeln!(input, r#"{{"id":8,"op":"format_disk"}}"#).unwrap();
    let e = next();
    assert_eq!(e.id, Some(8), "the id of a bad request is echoed");
    match e.body {
        Body::Error { message } => assert!(message.contains("bad request"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }

    writeln!(input, r#"{{"id":9,"op":"shutdown"}}"#).unwrap();
    let s = next();
    assert_eq!((s.id, s.body), (Some(9), Body::ShuttingDown));
    // In --stdio mode shutdown ends the loop without powering anything off.
    assert!(child.wait().unwrap().success());
}
