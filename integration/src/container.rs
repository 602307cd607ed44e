//! The container engine (podman or docker) as `scripts/container-engine` configures it for
//! this host, and containers that remove themselves when dropped.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::repo_root;

/// One container engine with the global flags and rlimits this host needs.
#[derive(Debug)]
pub struct Engine {
    pub program: String,
    global: Vec<String>,
    ulimits: Vec<String>,
    /// Every container a test makes carries this label (WASMBOX_IMAGE_TEST_LABEL, which
    /// scripts/image-test sets to check for leftovers after the run).
    pub label: String,
}

fn words(line: Option<&str>) -> Vec<String> {
    line.unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

impl Engine {
    /// The engine `scripts/container-engine` picks (CONTAINER_ENGINE, else podman, else
    /// docker), with its flags: one home for them, shared with `make image`.
    pub fn detect() -> Result<Arc<Engine>> {
        let script = repo_root().join("scripts/container-engine");
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#". "$1" && printf '%s\n%s\n%s\n' "$CONTAINER_ENGINE" "${engine_flags[*]}" "${ulimit_flags[*]}""#)
            .arg("container-engine")
            .arg(&script)
            .output()?;
        ensure!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout)?;
        let mut lines = text.lines();
        let program = lines.next().unwrap_or_default().to_string();
        ensure!(!program.is_empty(), "no container engine (podman or docker) is installed");
        let global = words(lines.next());
        let ulimits = words(lines.next());
        let label = std::env::var("WASMBOX_IMAGE_TEST_LABEL")
            .unwrap_or_else(|_| format!("wasmbox-image-test={}", std::process::id()));
        Ok(Arc::new(Engine { program, global, ulimits, label }))
    }

    pub fn is_podman(&self) -> bool {
        self.program.ends_with("podman")
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.global).stdin(Stdio::null());
        c
    }

    /// Runs `args`; its output, whether it succeeded or not.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command().args(args).output().with_context(|| format!("{} {}", self.program, args.join(" ")))
    }

    /// Runs `args` and returns its standard output; an error with its standard error if it fails.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                self.program,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `run --detach` of `image` as `name` with `args` before the image (and the host's
    /// rlimits and this run's label), returning a container removed when dropped.
    pub fn start(self: &Arc<Self>, name: &str, args: &[&str], image: &str) -> Result<Container> {
        let mut all: Vec<&str> = vec!["run", "--detach", "--name", name, "--label", &self.label];
        all.extend(self.ulimits.iter().map(String::as_str));
        all.extend_from_slice(args);
        all.push(image);
        self.run(&all)?;
        Ok(Container { engine: self.clone(), name: name.to_string() })
    }

    /// `run --rm` of `image` as `name` in the foreground (with the host's rlimits and this
    /// run's label): its output once it exits; an error, and the container removed, if it
    /// is still running after `within`.
    pub fn run_once(&self, name: &str, args: &[&str], image: &str, within: Duration) -> Result<Output> {
        let mut all: Vec<&str> = vec!["run", "--rm", "--name", name, "--label", &self.label];
        all.extend(self.ulimits.iter().map(String::as_str));
        all.extend_from_slice(args);
        all.push(image);
        let mut child = self.command().args(&all).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let deadline = Instant::now() + within;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.command().args(["rm", "--force", "--volumes", name]).output();
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} still ran after {within:?}: {}", all.join(" "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child.wait_with_output()?)
    }
}

/// A container of this run; `rm --force` when dropped.
#[derive(Debug)]
pub struct Container {
    pub engine: Arc<Engine>,
    pub name: String,
}

impl Container {
    /// `inspect --format` of this container.
    pub fn inspect(&self, format: &str) -> Result<String> {
        self.engine.run(&["inspect", "--format", format, &self.name])
    }

    /// The host PID of the container's first process (the supervisor); 0 when it is not running.
    pub fn pid(&self) -> Result<i32> {
        Ok(self.inspect("{{.State.Pid}}")?.parse()?)
    }

    pub fn running(&self) -> bool {
        self.inspect("{{.State.Running}}").is_ok_and(|r| r == "true")
    }

    pub fn exit_code(&self) -> Result<i32> {
        Ok(self.inspect("{{.State.ExitCode}}")?.parse()?)
    }

    /// What the container wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        match self.engine.output(&["logs", &self.name]) {
            Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            Err(e) => format!("(no logs: {e:#})"),
        }
    }

    /// Runs a command inside the container; its standard output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        self.engine.run(&all)
    }

    /// Waits until `url_ok` says the service answers, failing early (with the logs) if the
    /// container stops.
    pub async fn wait_until<F, Fut>(&self, within: Duration, what: &str, mut url_ok: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        loop {
            if url_ok().await {
                return Ok(());
            }
            if !self.running() {
                bail!("{} stopped before {what}:\n{}", self.name, self.logs());
            }
            if Instant::now() > deadline {
                bail!("{} not {what} within {within:?}:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let args: &[&str] = if self.engine.is_podman() {
            &["rm", "--force", "--volumes", "--time", "0"]
        } else {
            &["rm", "--force", "--volumes"]
        };
        let _ = self.engine.command().args(args).arg(&self.name).output();
    }
}
