//! A headless Chromium driven over the W3C WebDriver protocol (JSON over HTTP to Debian's
//! `chromedriver`), for the web console's tests: open a page, find elements by CSS selector,
//! read their text, click, type, run a script, take a screenshot. The browser and its driver are
//! killed when the [`Browser`] is dropped, even when a test fails.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver names an element reference with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// One WebDriver request to `127.0.0.1:port`: the status and the JSON answer.
fn call(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the headers, then as many bytes as they say.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "closed before the end of the headers",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    // Without a length, the body ends when the connection does (`Connection: close`); a
    // chunked one at its last chunk.
    while match length {
        Some(len) => raw.len() < split + 4 + len,
        None => !(chunked && raw[split + 4..].windows(5).any(|w| w == b"0\r\n\r\n")),
    } {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut payload = raw[split + 4..].to_vec();
    if chunked {
        payload = unchunk(&payload);
    }
    let value = serde_json::from_slice(&payload).map_err(|e| {
        std::io::Error::other(format!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&payload)
        ))
    })?;
    Ok((status, value))
}

fn unchunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        // A chunk's size line may carry extensions after a `;`.
        let line = String::from_utf8_lossy(&body[..eol]);
        let size =
            usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&body[start..(start + size).min(body.len())]);
        body = &body[(start + size + 2).min(body.len())..];
    }
    out
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session through it that
    /// accepts, besides what the system trusts, the certificates whose public keys hash (SHA-256
    /// of the SubjectPublicKeyInfo, base64) to one of `pinned`: a self-signed API's.
    pub fn start(pinned: &[String]) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver, installed by scripts/deps.sh)");
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(call(port, "GET", "/status", None), Ok((200, v)) if v["value"]["ready"] == true)
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = browser._profile.path().display().to_string();
        let (status, answer) = call(
            port,
            "POST",
            "/session",
            Some(&json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--window-size=1280,1000", format!("--user-data-dir={profile}"),
                        format!("--ignore-certificate-errors-spki-list={}", pinned.join(",")),
                    ],
                },
            }}})),
        )
        .unwrap();
        assert_eq!(status, 200, "new session: {answer}");
        browser.session = answer["value"]["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, answer) = call(self.port, method, &path, body.as_ref()).unwrap();
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    /// The elements matching CSS `selector` now.
    pub fn find_all(&self, selector: &str) -> Vec<String> {
        self.command(
            "POST",
            "/elements",
            Some(json!({ "using": "css selector", "value": selector })),
        )
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
    }

    /// The first element matching `selector`, waiting up to 30 s for it to appear.
    pub fn wait_for(&self, selector: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.find_all(selector).into_iter().next() {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no `{selector}` within 30 s; the page shows:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls until `check` holds on the text of `selector`'s first element (30 s at most).
    pub fn wait_text(&self, selector: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text(selector);
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "`{selector}` never showed {what}; it shows {text:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rendered text of `selector`'s first element ("" when there is none).
    pub fn text(&self, selector: &str) -> String {
        self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText || e.textContent : '';",
            json!([selector]),
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Runs `script` in the page with `args`; its return value.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    pub fn click(&self, selector: &str) {
        let element = self.wait_for(selector);
        self.command(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    pub fn type_into(&self, selector: &str, text: &str) {
        let element = self.wait_for(selector);
        self.command(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Saves the page as it looks now as a PNG at `path`.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.command("GET", "/screenshot", None);
        let png = decode_base64(encoded.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = call(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (what WebDriver sends screenshots in).
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}
