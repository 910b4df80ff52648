//! A fake HTTP API server on 127.0.0.1 for the engines' unit tests (Kubernetes' API server,
//! slurmrestd): it records each request and answers from a function of method and path.

use serde_json::Value;

/// (method, path, authorization header, JSON body) of one request.
pub type Recorded = (String, String, String, Value);

/// A fake API server on 127.0.0.1: records each request and answers from
/// `reply(method, path)`.
pub fn fake_api(
    requests: usize,
    reply: impl Fn(&str, &str) -> (u16, Value) + Send + 'static,
) -> (String, std::thread::JoinHandle<Vec<Recorded>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = vec![];
        'conns: for stream in listener.incoming() {
            let stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue 'conns;
                }
                let mut parts = line.split_whitespace();
                // (An empty query, `jobs?`, is the path itself.)
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").trim_end_matches('?').to_string());
                let (mut len, mut auth) = (0usize, String::new());
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "authorization" => auth = v.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let (code, answer) = reply(&method, &path);
                let answer = answer.to_string();
                write!(writer, "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len())
                    .unwrap();
                seen.push((method, path, auth, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                if seen.len() == requests {
                    return seen;
                }
            }
        }
        seen
    });
    (url, handle)
}
