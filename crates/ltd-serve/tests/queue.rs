//! The queue under load, against a real `ltd-serve` process: 16 concurrent requests with
//! `--queue 4` each get their own image or a 503 with `Retry-After`, none lost or mixed up;
//! `/interrupt` stops the running job; a client that disconnects frees its place; SIGTERM
//! stops the running job, answers it, and exits.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Server;

fn info(v: &Value) -> Value {
    serde_json::from_str(v["info"].as_str().expect("info is a JSON string")).unwrap()
}

/// Waits until the running job has done a step (so that it is running, not waiting).
fn wait_running(server: &Server) {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let (_, p) = server.get("/sdapi/v1/progress?skip_current_image=true");
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no job started");
}

/// A job long enough to interrupt (the default model's steps take milliseconds).
fn long_job() -> Value {
    json!({"prompt": "long", "steps": 1000, "seed": 1})
}

#[test]
fn sixteen_concurrent_requests_with_a_queue_of_four() {
    let server = Server::start(&["--queue", "4"]);
    let results: Vec<(usize, u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|k| {
                let server = &server;
                s.spawn(move || {
                    let body = json!({"prompt": format!("prompt number {k}"), "seed": 1000 + k,
                                      "steps": 40, "batch_size": 1 + k % 2});
                    let (status, v) = server.post("/sdapi/v1/txt2img", &body);
                    (k, status, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut ok, mut busy) = (0, 0);
    for (k, status, v) in &results {
        match status {
            200 => {
                ok += 1;
                let i = info(v);
                let n = 1 + k % 2;
                assert_eq!(v["images"].as_array().unwrap().len(), n, "request {k}");
                assert_eq!(i["all_seeds"], json!(vec![1000 + k; n]), "request {k}");
                assert_eq!(i["prompt"], json!(format!("prompt number {k}")), "request {k}");
                for text in i["infotexts"].as_array().unwrap() {
                    let text = text.as_str().unwrap();
                    assert!(text.starts_with(&format!("prompt number {k}\n")), "{k}: {text}");
                    assert!(text.contains(&format!("Seed: {}", 1000 + k)), "{k}: {text}");
                }
            }
            503 => {
                busy += 1;
                assert!(v["__retry_after"].as_str().is_some(), "503 without Retry-After: {v}");
                assert_eq!(v["detail"], json!("the queue is full; retry later"));
            }
            other => panic!("request {k}: unexpected {other}: {v}"),
        }
    }
    assert_eq!(ok + busy, 16);
    // At least the queue's four places are served. A fifth (the running job's) only when the
    // worker took a job off the queue before the burst filled it: on a loaded machine all 16
    // requests can arrive first, and then exactly four are served (seen once in a full test
    // run). The server is right either way; `>= 5` made the test depend on thread timing.
    assert!(ok >= 4, "the four waiting places are served: {ok}");
    // Afterwards the queue is empty again.
    let (_, p) = server.get("/sdapi/v1/progress");
    assert_eq!(p["state"]["job_count"], json!(0));
}

#[test]
fn interrupt_stops_the_running_job() {
    let server = Server::start(&[]);
    std::thread::scope(|s| {
        let job = s.spawn(|| server.post("/sdapi/v1/txt2img", &long_job()));
        wait_running(&server);
        // The first poll asks for a preview, decoded at the next step; a later poll has it.
        let end = Instant::now() + Duration::from_secs(30);
        let p = loop {
            let (_, p) = server.get("/sdapi/v1/progress");
            if p["current_image"].is_string() {
                break p;
            }
            assert!(Instant::now() < end, "no preview: {p}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(p["progress"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["eta_relative"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["state"]["sampling_steps"], json!(1000));
        let png = support::b64(p["current_image"].as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG", "the preview is a PNG");
        assert_eq!(server.post("/sdapi/v1/interrupt", &json!({})).0, 200);
        let start = Instant::now();
        let (status, v) = job.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(20), "stopped at the next step");
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["images"], json!([]));
        let i = info(&v);
        assert_eq!(i["interrupted"], json!(true));
        assert!(i["detail"].as_str().unwrap().starts_with("interrupted after step"), "{i}");
    });
    // The next job runs normally.
    let (status, v) = server.post("/sdapi/v1/txt2img", &json!({"prompt": "after", "steps": 2}));
    assert_eq!((status, v["images"].as_array().unwrap().len()), (200, 1));
}

#[test]
fn a_client_that_disconnects_frees_its_place() {
    let server = Server::start(&["--queue", "1"]);
    std::thread::scope(|s| {
        let running = s.spawn(|| server.post("/sdapi/v1/txt2img", &long_job()));
        wait_running(&server);
        // A second request takes the one place, then its client goes away.
        let addr = server.url.trim_start_matches("http://").to_string();
        let body = json!({"prompt": "gone", "steps": 2}).to_string();
        let mut conn = TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while server.get("/sdapi/v1/progress").1["state"]["job_count"] != json!(2) {
            assert!(Instant::now() < end, "the second request never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The queue is full now…
        assert_eq!(server.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 1})).0, 503);
        drop(conn);
        // …until the gone client's place is freed.
        let end = Instant::now() + Duration::from_secs(10);
        while server.get("/sdapi/v1/progress").1["state"]["job_count"] != json!(1) {
            assert!(Instant::now() < end, "the disconnected client kept its place");
            std::thread::sleep(Duration::from_millis(20));
        }
        let waiting =
            s.spawn(|| server.post("/sdapi/v1/txt2img", &json!({"prompt": "next", "steps": 1})));
        std::thread::sleep(Duration::from_millis(200));
        server.post("/sdapi/v1/interrupt", &json!({}));
        assert_eq!(running.join().unwrap().0, 200);
        let (status, v) = waiting.join().unwrap();
        assert_eq!((status, v["images"].as_array().map(Vec::len)), (200, Some(1)), "{v}");
    });
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_running_job_answers_and_exits() {
    let mut server = Server::start(&[]);
    let url = server.url.clone();
    let job = std::thread::spawn(move || {
        // A raw request, so that the answer is read even as the server closes.
        let addr = url.trim_start_matches("http://").to_string();
        let body = long_job().to_string();
        let mut conn = TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer
    });
    wait_running(&server);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.wait_exit(30).expect("ltd-serve exits after SIGTERM");
    assert!(exit.success(), "{exit:?}");
    let answer = job.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("interrupted after step"), "{answer}");
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
}
