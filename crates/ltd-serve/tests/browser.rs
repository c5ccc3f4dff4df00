//! The web page in a real headless browser (the system's Chromium, driven over the Chrome
//! DevTools protocol): the page loads and lists the model and samplers, a generation runs to
//! the end and its image, parameters and download link appear (and enter the history), and an
//! invalid size shows the server's message. Skipped, saying so, where no Chromium is
//! installed (`apt-get install chromium`).

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const BROWSERS: &[&str] =
    &["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];

/// A headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(exe: &Path) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // Chromium prints "DevTools listening on ws://…/devtools/browser/…"; the page's own
        // socket is listed at /json/list on the same port.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_ws =
            rx.recv_timeout(Duration::from_secs(60)).expect("chromium's DevTools socket");
        let port =
            browser_ws.trim_start_matches("ws://").split(['/', ':']).nth(1).unwrap().to_string();
        let page_ws = (0..100)
            .find_map(|_| {
                let text = ureq::get(format!("http://127.0.0.1:{port}/json/list"))
                    .call()
                    .ok()?
                    .body_mut()
                    .read_to_string()
                    .ok()?;
                let list: Value = serde_json::from_str(&text).ok()?;
                let page = list.as_array()?.iter().find(|t| t["type"] == "page")?;
                Some(page["webSocketDebuggerUrl"].as_str()?.to_string())
            })
            .expect("a page target");
        let (ws, _) = tungstenite::connect(page_ws).expect("DevTools websocket");
        Self { child, ws, next_id: 0, _profile: profile }
    }

    /// Sends one DevTools command and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else { continue };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page (promises awaited); its value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `js` is true in the page.
    fn wait_for(&mut self, js: &str, what: &str) {
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            if self.eval(js) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let body = self.eval("document.body.innerText");
        panic!("timed out waiting for {what}; the page says:\n{body}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_page_generates_an_image_and_shows_errors() {
    let Some(exe) = BROWSERS.iter().map(Path::new).find(|p| p.is_file()) else {
        eprintln!("SKIPPED: no Chromium at {BROWSERS:?}; install it (apt-get install chromium) to run the browser test");
        return;
    };
    let server = Server::start(&[]);
    let mut browser = Browser::start(exe);
    browser.call("Page.navigate", json!({"url": format!("{}/", server.url)}));
    browser.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('model') && document.getElementById('model').options.length > 0 && document.getElementById('sampler').options.length > 1",
        "the page to list the model and samplers",
    );

    // A generation, with a live progress poll, to its image.
    browser.eval(
        "document.getElementById('prompt').value = 'a red circle';
         document.getElementById('steps').value = '25';
         document.getElementById('seed').value = '5';
         document.getElementById('generate').click(); true",
    );
    browser.wait_for(
        "(() => { const i = document.querySelector('#images img'); return !!i && i.complete && i.naturalWidth > 0; })()",
        "the generated image",
    );
    let params = browser.eval("document.getElementById('params').textContent");
    assert!(params.as_str().unwrap().starts_with("a red circle\nSteps: 25"), "{params}");
    assert!(params.as_str().unwrap().contains("Seed: 5,"), "{params}");
    assert_eq!(
        browser
            .eval("document.getElementById('download').href.startsWith('data:image/png;base64,')"),
        json!(true)
    );
    assert_eq!(browser.eval("document.querySelectorAll('#history img').length"), json!(1));
    assert_eq!(browser.eval("document.getElementById('error').textContent"), json!(""));

    // An invalid size: the server's message appears.
    browser.eval(
        "document.getElementById('width').value = '30';
         document.getElementById('generate').click(); true",
    );
    browser
        .wait_for("document.getElementById('error').textContent.length > 0", "the error message");
    let error = browser.eval("document.getElementById('error').textContent");
    assert_eq!(error, json!("width: 30 is not a multiple of the model's VAE scale factor 4"));
}
