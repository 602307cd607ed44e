//! Scenarios run against every mode in one run, side by side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::loadgen::{self, Load, Target};
use crate::modes::{Mode, Server, Setup};
use crate::stats::{Recorder, Summary};

/// One kind of request, the same for every mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub key: &'static str,
    pub title: &'static str,
    pub path: &'static str,
    #[serde(skip)]
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    /// The modes that can serve it (none: every mode).
    #[serde(skip)]
    pub only: Option<&'static [Mode]>,
    /// A scenario whose (a) cell this one's (a) cell is compared with, side by side.
    pub baseline: Option<&'static str>,
}

impl Scenario {
    pub fn all() -> Vec<Scenario> {
        vec![
            Scenario {
                key: "hello",
                title: "hello: pure overhead (empty body, 20-byte answer)",
                path: "/hello",
                body: Bytes::new(),
                headers: vec![],
                only: None,
                baseline: None,
            },
            Scenario {
                key: "echo",
                title: "echo 64 KiB: body in, same body out",
                path: "/echo",
                body: Bytes::from(vec![b'x'; 64 << 10]),
                headers: vec![],
                only: None,
                baseline: None,
            },
            Scenario {
                key: "compute",
                title: "compute: json-compress 6000 records (build JSON, aggregate, deflate)",
                path: "/json-compress?arg=6000",
                body: Bytes::new(),
                headers: vec![],
                only: None,
                baseline: None,
            },
            Scenario {
                key: "memory",
                title: "memory: allocate and touch 64 MiB",
                path: "/alloc?arg=64",
                body: Bytes::new(),
                headers: vec![("Memory-Request".into(), "128".into())],
                only: None,
                baseline: None,
            },
            Scenario {
                key: "component-hello",
                title: "component hello: a wasi:http/proxy component's 23-byte answer (WasmBox only; compared with the module hello)",
                path: "/http-hello",
                body: Bytes::new(),
                headers: vec![],
                only: Some(&[Mode::WasmBox]),
                baseline: Some("hello"),
            },
        ]
    }

    /// Whether `mode` can serve this scenario.
    pub fn runs_on(&self, mode: Mode) -> bool {
        self.only.is_none_or(|only| only.contains(&mode))
    }

    fn target(&self, server: &Server) -> Target {
        Target { addr: server.addr, path: self.path.into(), headers: self.headers.clone(), body: self.body.clone() }
    }
}

/// How long and how hard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub name: String,
    /// Closed loop: connections and duration per scenario and mode.
    pub connections: usize,
    pub duration: Duration,
    pub max_requests: u64,
    /// Open loop on hello: requests per second and duration.
    pub open_rate: f64,
    pub open_duration: Duration,
    /// Requests sent one by one before measuring (compiles, fills caches).
    pub warmup: u64,
    /// Each scenario's `duration` is cut into this many rounds, and the modes take turns
    /// round by round, so a drift of the machine's speed during the run (other tenants of a
    /// virtual machine, thermal limits) reaches every mode alike instead of skewing ratios.
    pub rounds: u32,
}

impl Plan {
    /// Well under a minute in total: for smoke runs and CI.
    pub fn quick() -> Plan {
        Plan {
            name: "quick".into(),
            connections: 4,
            duration: Duration::from_millis(1500),
            max_requests: 200_000,
            open_rate: 200.0,
            open_duration: Duration::from_secs(1),
            warmup: 3,
            rounds: 1,
        }
    }

    /// For reports.
    pub fn full() -> Plan {
        Plan {
            name: "full".into(),
            connections: 8,
            duration: Duration::from_secs(15),
            max_requests: 5_000_000,
            open_rate: 500.0,
            open_duration: Duration::from_secs(15),
            warmup: 20,
            rounds: 5,
        }
    }
}

/// One (scenario, mode) cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub scenario: &'static str,
    pub mode: Mode,
    pub summary: Summary,
    /// Server CPU per answered request, µs (closed loop only).
    pub cpu: Option<CpuPerRequest>,
    #[serde(skip)]
    pub recorder: Recorder,
}

/// Where a mode's CPU went, per 2xx answer: the server process itself (for WasmBox the
/// supervisor; for spawn-per-request including the processes it spawned and reaped) and
/// its long-lived children (WasmBox's workers). The load generator is not counted.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CpuPerRequest {
    pub server_us: f64,
    pub children_us: f64,
}

impl CpuPerRequest {
    pub fn of(cpu: crate::modes::CpuUse, answered: u64) -> Option<CpuPerRequest> {
        let n = answered as f64;
        (answered > 0)
            .then(|| CpuPerRequest { server_us: cpu.own_us as f64 / n, children_us: cpu.children_us as f64 / n })
    }

    pub fn total_us(&self) -> f64 {
        self.server_us + self.children_us
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    pub plan: Plan,
    pub machine: crate::report::Machine,
    pub modes: Vec<Mode>,
    /// Workers of (a), threads of (b).
    pub workers: usize,
    /// Engine of (a), (b) and (c).
    pub engine: String,
    pub scenarios: Vec<Scenario>,
    pub closed: Vec<Cell>,
    pub open: Vec<Cell>,
    /// Why a mode was left out of the open-loop run.
    pub open_skipped: BTreeMap<String, String>,
    pub extras: crate::extras::Extras,
    pub wall: Duration,
}

/// Runs every scenario against every mode. One server is loaded at a time (all of the
/// machine's cores for the one being measured), the modes taking turns in rounds, so the
/// comparison shares one machine state.
pub async fn run(plan: Plan, setup: &Setup, modes: &[Mode], scenarios: Vec<Scenario>) -> anyhow::Result<Results> {
    let started = Instant::now();
    let progress = progress_bar();
    let mut open = Vec::new();
    let mut open_skipped = BTreeMap::new();
    // Every server runs for the whole of the closed-loop part (idle ones cost nothing
    // measurable), so the modes can take turns.
    let mut servers = Vec::new();
    for &mode in modes {
        progress.set_message(format!("{}: starting", mode.title()));
        servers.push(Server::start(mode, setup)?);
    }
    let rounds = plan.rounds.max(1);
    let slice = plan.duration / rounds;
    let mut measured: Vec<(&'static str, Mode, loadgen::Measurement, crate::modes::CpuUse)> = Vec::new();
    for scenario in &scenarios {
        for server in servers.iter().filter(|s| scenario.runs_on(s.mode)) {
            warm_up(&scenario.target(server), plan.warmup, server.mode, scenario.key).await?;
        }
        for round in 0..rounds {
            for server in servers.iter().filter(|s| scenario.runs_on(s.mode)) {
                progress.set_message(format!(
                    "{} / {} (round {} of {rounds})",
                    server.mode.title(),
                    scenario.key,
                    round + 1
                ));
                let load = Load::Closed {
                    connections: plan.connections,
                    duration: slice,
                    max_requests: plan.max_requests / u64::from(rounds),
                };
                let before = crate::modes::CpuUse::of(server.pid());
                let m = loadgen::run(&scenario.target(server), load, &progress).await?;
                let cpu = crate::modes::CpuUse::of(server.pid()).since(before);
                match measured.iter_mut().find(|(s, mode, _, _)| *s == scenario.key && *mode == server.mode) {
                    Some((_, _, total, total_cpu)) => {
                        total.absorb(m);
                        total_cpu.add(cpu);
                    }
                    None => measured.push((scenario.key, server.mode, m, cpu)),
                }
            }
        }
    }
    let closed: Vec<Cell> = measured
        .into_iter()
        .map(|(scenario, mode, m, cpu)| Cell {
            scenario,
            mode,
            summary: Summary::of(&m),
            cpu: CpuPerRequest::of(cpu, m.ok()),
            recorder: m.recorder,
        })
        .collect();
    // Open loop on hello at a fixed rate, for the modes that can sustain it.
    if let Some(hello) = scenarios.iter().find(|s| s.key == "hello") {
        for server in &servers {
            let mode = server.mode;
            let capacity =
                closed.iter().find(|c| c.mode == mode && c.scenario == "hello").map(|c| c.summary.throughput);
            if capacity.is_some_and(|c| c < plan.open_rate * 1.2) {
                open_skipped.insert(
                    mode.title().into(),
                    format!("its closed-loop capacity, {:.0} req/s, is below the rate", capacity.unwrap_or_default()),
                );
                continue;
            }
            progress.set_message(format!("{} / hello, open loop", mode.title()));
            let load = Load::Open {
                rate: plan.open_rate,
                connections: plan.connections * 4,
                duration: plan.open_duration,
                max_requests: plan.max_requests,
            };
            let m = loadgen::run(&hello.target(server), load, &progress).await?;
            open.push(Cell { scenario: "hello", mode, summary: Summary::of(&m), cpu: None, recorder: m.recorder });
        }
    }
    for server in servers {
        server.stop();
    }
    progress.set_message("cold start, respawn, memory, sessions");
    let extras = crate::extras::measure(setup, &plan).await?;
    progress.finish_and_clear();
    Ok(Results {
        machine: crate::report::Machine::describe(),
        modes: modes.to_vec(),
        workers: setup.workers,
        engine: setup.engine.clone(),
        scenarios,
        closed,
        open,
        open_skipped,
        extras,
        wall: started.elapsed(),
        plan,
    })
}

/// Sends `n` requests one at a time; each must succeed, or the scenario is broken for this
/// mode and measuring it would mean nothing.
pub(crate) async fn warm_up(target: &Target, n: u64, mode: Mode, scenario: &str) -> anyhow::Result<()> {
    let load = Load::Closed { connections: 1, duration: Duration::from_secs(120), max_requests: n };
    let m = loadgen::run(target, load, &indicatif::ProgressBar::hidden()).await?;
    anyhow::ensure!(
        m.ok() == n,
        "{} / {scenario}: warm-up got {:?} and {} without an answer",
        mode.title(),
        m.statuses,
        m.failed
    );
    Ok(())
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} requests  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
