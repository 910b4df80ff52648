//! Starting the test server from its tests: the process, killed when dropped, and its port.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A server process, killed when dropped (also when an assertion fails).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the server on `root` (port 0: any free one) with `extra` arguments; the port it
/// listens on is read from the first line it prints.
pub fn start(root: &std::path::Path, port: u16, extra: &[&str]) -> (Server, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_btm-s3-server"))
        .args(["--root", root.to_str().unwrap(), "--port", &port.to_string(), "--access-key", "ak", "--secret-key", "sk"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in `{line}`"));
    (Server(child), port)
}
