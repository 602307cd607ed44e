//! A private nginx (Debian's, installed by `scripts/ensure-nginx` when missing) in front of
//! WasmBox replicas, configured as deployment/README.md tells operators.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::repo_root;

/// nginx, installed by `scripts/ensure-nginx` when missing.
pub fn nginx_binary() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("/usr/sbin/nginx");
    if !path.exists() {
        let status = Command::new(repo_root().join("scripts/ensure-nginx")).status()?;
        anyhow::ensure!(status.success(), "scripts/ensure-nginx failed ({status}); the load-balancer test needs nginx");
    }
    Ok(path)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private nginx: its own config, logs and temp dirs; stopped when dropped.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on 127.0.0.1:`port` in front of `upstreams`, with the location block
    /// deployment/README.md recommends; on `plain_port` (if given) the same without
    /// `underscores_in_headers`.
    pub fn start(upstreams: &[std::net::SocketAddr], port: u16, plain_port: Option<u16>) -> anyhow::Result<Nginx> {
        let binary = nginx_binary()?;
        let dir = tempfile::tempdir()?;
        let d = dir.path().display().to_string();
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let p = dir.path().join(sub);
            std::fs::create_dir(&p)?;
            // nginx's workers run as nobody when the master is root.
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        }
        let servers: String =
            upstreams.iter().map(|a| format!("        server {a} max_fails=1 fail_timeout=10s;\n")).collect();
        // The location block is the one deployment/README.md recommends.
        let location = r#"
        location / {
            proxy_pass http://wasmbox;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_429 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_read_timeout 330s;
        }"#;
        let plain = match plain_port {
            Some(plain_port) => format!(
                "    server {{\n        # nginx's default: header names with underscores (cpu_quota) are dropped.\n        listen 127.0.0.1:{plain_port};\n{location}\n    }}\n"
            ),
            None => String::new(),
        };
        let conf = format!(
            r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format lb '$status $request_uri upstream=$upstream_addr upstream_status=$upstream_status';
    access_log {d}/access.log lb;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 16m;
    upstream wasmbox {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        underscores_in_headers on;
{location}
    }}
{plain}}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let nginx = Nginx { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not listen: {}", nginx.read("error.log"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    /// A file of its directory (`access.log`, `error.log`).
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
