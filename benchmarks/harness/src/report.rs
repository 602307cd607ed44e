//! The report: a Markdown file with the machine, a table per scenario with the ratios of
//! WasmBox to each alternative, the extra measurements, and an SVG latency plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::modes::Mode;
use crate::sessions::Sessions;
use crate::stats::{Summary, ratio};
use crate::suite::{Cell, CpuPerRequest, Results};

/// What the numbers were measured on.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub cgroup: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            && !std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default().trim().is_empty()
        {
            "v2".into()
        } else if Path::new("/sys/fs/cgroup/memory").exists() {
            "v1".into()
        } else {
            "none".into()
        };
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: mem_kib / (1024.0 * 1024.0),
            kernel,
            cgroup,
        }
    }

    /// One line: CPU, cores, memory, kernel, cgroup version.
    fn line(&self) -> String {
        format!(
            "{} ({} cores), {:.1} GiB, Linux {}, cgroup {}",
            self.cpu, self.cores, self.memory_gib, self.kernel, self.cgroup
        )
    }
}

fn ms(us: u64) -> String {
    if us >= 100_000 { format!("{:.0}", us as f64 / 1000.0) } else { format!("{:.2}", us as f64 / 1000.0) }
}

fn x(r: Option<f64>) -> String {
    r.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

/// Server CPU per answered request, µs, with the workers' share where there are any.
fn cpu(c: Option<&CpuPerRequest>) -> String {
    match c {
        Some(c) if c.children_us > 0.0 => format!("{:.0} (workers {:.0})", c.total_us(), c.children_us),
        Some(c) => format!("{:.0}", c.total_us()),
        None => "-".into(),
    }
}

fn row(out: &mut String, mode: Mode, s: &Summary, cpu_use: Option<&CpuPerRequest>) {
    let errors = if s.errors.is_empty() {
        "0".to_owned()
    } else {
        s.errors.iter().map(|(k, n)| format!("{n} x {k}")).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(
        out,
        "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
        mode.title(),
        s.requests,
        s.throughput,
        ms(s.p50_us),
        ms(s.p90_us),
        ms(s.p99_us),
        ms(s.p999_us),
        errors,
        cpu(cpu_use)
    );
}

fn find<'a>(cells: &'a [Cell], scenario: &str, mode: Mode) -> Option<&'a Summary> {
    find_cell(cells, scenario, mode).map(|c| &c.summary)
}

fn find_cell<'a>(cells: &'a [Cell], scenario: &str, mode: Mode) -> Option<&'a Cell> {
    cells.iter().find(|c| c.scenario == scenario && c.mode == mode)
}

/// The ratios of (a) to each other mode in one scenario: throughput and p99.
fn ratios(out: &mut String, cells: &[Cell], scenario: &str) {
    let Some(a) = find(cells, scenario, Mode::WasmBox) else { return };
    let others = [Mode::InProcess, Mode::SpawnPerRequest, Mode::PlainHttp];
    if !others.iter().any(|&m| find(cells, scenario, m).is_some()) {
        return; // A scenario only WasmBox runs has no ratio to the others.
    }
    let _ = writeln!(out, "\n| ratio | throughput | p50 | p99 |\n|---|---|---|---|");
    for other in others {
        if let Some(o) = find(cells, scenario, other) {
            let _ = writeln!(
                out,
                "| (a)/({}) | {} | {} | {} |",
                other.letter(),
                x(ratio(a.throughput, o.throughput)),
                x(ratio(a.p50_us as f64, o.p50_us as f64)),
                x(ratio(a.p99_us as f64, o.p99_us as f64)),
            );
        }
    }
}

/// Writes `<dir>/<name>.md`, `<name>.svg` and `<name>.json`; returns the Markdown's path.
pub fn write(results: &Results, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let svg = dir.join(format!("{name}.svg"));
    plot(results, &svg)?;
    write_md_json(dir, name, &markdown(results, &format!("{name}.svg")), results)
}

/// Writes the report of `wasmbox-bench sessions`: `<dir>/<name>.md` and `<name>.json`.
pub fn write_sessions(results: &crate::sessions::Results, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    write_md_json(dir, name, &sessions_markdown(results), results)
}

fn write_md_json(dir: &Path, name: &str, md: &str, json: &impl serde::Serialize) -> anyhow::Result<PathBuf> {
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_vec_pretty(json)?)?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, md)?;
    Ok(path)
}

pub fn sessions_markdown(r: &crate::sessions::Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# WasmBox sessions benchmark: {}, engine {}\n", r.plan.name, r.engine);
    let _ = writeln!(
        out,
        "Machine: {}. One run, {:.0} s of wall time; WasmBox with {} pre-forked workers, cgroups {}.\n",
        r.machine.line(),
        r.wall.as_secs_f64(),
        r.workers,
        cgroups(r.sessions.cgroups_active),
    );
    sessions(&mut out, &r.sessions);
    out
}

fn cgroups(active: bool) -> &'static str {
    if active { "on" } else { "off (not available here)" }
}

/// The sessions tables: per heap size, a message's state cost and latency beside a hello's;
/// then the one-off `fill` that made each heap.
fn sessions(out: &mut String, s: &Sessions) {
    let Some(first) = s.heaps.first() else { return };
    let _ = writeln!(out, "## Sessions (mode a, the counter function)\n");
    let _ = writeln!(
        out,
        "Per heap size, one session is filled with that many MiB and then sent, {} times, a stateless \
         hello and a message changing one byte of its heap (`touch 1`) in turn: restore (worker: \
         decompress the snapshot, write its pages, set the globals), capture (worker: find the changed \
         pages, compress them, encode) and commit (supervisor: temporary file, fsync, rename, fsync of the \
         directory, on {}) are the server's own times from the touch's response headers, snapshot bytes \
         the compressed size it committed, touch and hello latency what the client measured end to end, \
         and ratio touch p50 / hello p50 (p99 of so few messages is about the slowest).\n",
        first.messages, s.state_filesystem
    );
    let _ = writeln!(
        out,
        "| heap MiB | snapshot bytes | restore µs p50 | capture µs p50 | commit µs p50 | \
         restore+capture+commit µs p50 / p99 | touch latency µs p50 / p99 | hello µs p50 | ratio |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for h in &s.heaps {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} |",
            h.heap_mib,
            h.snapshot_bytes,
            h.restore.p50_us,
            h.capture.p50_us,
            h.commit.p50_us,
            h.state.p50_us,
            h.state.p99_us,
            h.touch.p50_us,
            h.touch.p99_us,
            h.hello.p50_us,
            x(h.touch_to_hello)
        );
    }
    let _ = writeln!(
        out,
        "\nThe `fill` message that made each heap, once: the first time all its pages are compressed.\n\n\
         | heap MiB | snapshot bytes | pages compressed | restore µs | capture µs | commit µs | latency µs |\n\
         |---|---|---|---|---|---|---|"
    );
    for h in &s.heaps {
        let f = &h.fill;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            h.heap_mib, f.snapshot_bytes, f.pages_compressed, f.restore_us, f.capture_us, f.commit_us, f.latency_us
        );
    }
    out.push('\n');
}

pub fn markdown(r: &Results, svg_name: &str) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let p = &r.plan;
    let _ = writeln!(out, "# WasmBox benchmark: {}, engine {}\n", p.name, r.engine);
    let _ = writeln!(
        out,
        "Machine: {}. One run, {:.0} s of wall time; \
         one server loaded at a time, the modes taking turns in {} round(s) per scenario.\n",
        m.line(),
        r.wall.as_secs_f64(),
        p.rounds
    );
    let _ = writeln!(
        out,
        "Closed loop: {} keep-alive connections on loopback, {:.1} s per scenario and mode, after {} \
         warm-up requests. Latencies in ms, of successful requests; throughput counts 2xx answers.\n\n\
         Modes: (a) WasmBox, supervisor and {} pre-forked workers, cgroups {}; (b) the same engine \
         and module cache in one process on {} threads; (c) a fresh `wasmbox-worker --one-shot` \
         process per request (artifacts precompiled); (d) hyper without Wasm.\n",
        p.connections,
        p.duration.as_secs_f64(),
        p.warmup,
        r.workers,
        cgroups(r.extras.cgroups_active),
        r.workers,
    );
    for s in &r.scenarios {
        let _ = writeln!(out, "## {}\n", s.title);
        let _ = writeln!(
            out,
            "| mode | requests | req/s | p50 | p90 | p99 | p99.9 | errors | server CPU us/req |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for &mode in &r.modes {
            if let Some(c) = find_cell(&r.closed, s.key, mode) {
                row(&mut out, mode, &c.summary, c.cpu.as_ref());
            }
        }
        ratios(&mut out, &r.closed, s.key);
        if let Some(base) = s.baseline {
            if let (Some(a), Some(b)) = (find(&r.closed, s.key, Mode::WasmBox), find(&r.closed, base, Mode::WasmBox)) {
                let _ = writeln!(
                    out,
                    "\n| ratio | throughput | p50 | p99 |\n|---|---|---|---|\n| (a) {} / (a) {base} | {} | {} | {} |",
                    s.key,
                    x(ratio(a.throughput, b.throughput)),
                    x(ratio(a.p50_us as f64, b.p50_us as f64)),
                    x(ratio(a.p99_us as f64, b.p99_us as f64)),
                );
            }
        }
        out.push('\n');
    }
    if !r.open.is_empty() || !r.open_skipped.is_empty() {
        let _ = writeln!(
            out,
            "## hello, open loop at {:.0} req/s for {:.0} s\n\nLatency from when each request was due, \
             so queueing counts.\n\n| mode | requests | req/s | p50 | p90 | p99 | p99.9 | errors | server CPU us/req |\n\
             |---|---|---|---|---|---|---|---|---|",
            p.open_rate,
            p.open_duration.as_secs_f64()
        );
        for c in &r.open {
            row(&mut out, c.mode, &c.summary, c.cpu.as_ref());
        }
        ratios(&mut out, &r.open, "hello");
        for (mode, why) in &r.open_skipped {
            let _ = writeln!(out, "\n{mode} not run open-loop: {why}.");
        }
        out.push('\n');
    }
    let e = &r.extras;
    let _ = writeln!(out, "## Cold start, respawn, memory, cgroups (mode a)\n");
    let _ = writeln!(out, "| measurement | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| first call of a never-seen module, empty artifact store (Wasmtime: waits for its compile in a compile process; WasmEdge: interpreted while it compiles), p50 / p99 of {} | {} / {} ms |",
        e.cold_samples,
        ms(e.cold_empty_cache_p50_us),
        ms(e.cold_empty_cache_p99_us)
    );
    let _ = writeln!(
        out,
        "| the call right after it, same module (WasmEdge: still interpreted), p50 / p99 of {}; first / second p50 | {} / {} ms; {:.2}x |",
        e.cold_samples,
        ms(e.cold_second_call_p50_us),
        ms(e.cold_second_call_p99_us),
        e.cold_empty_cache_p50_us as f64 / e.cold_second_call_p50_us.max(1) as f64
    );
    let _ = writeln!(
        out,
        "| first call of a module no worker has loaded (modules of one tenant), artifact in the store, p50 / p99 of {} | {} / {} ms |",
        e.cold_samples,
        ms(e.cold_warm_cache_p50_us),
        ms(e.cold_warm_cache_p99_us)
    );
    let _ = writeln!(
        out,
        "| worker respawn, SIGKILL to pool full again, p50 / p99 / max of {}: zygote | {} / {} / {} ms |",
        e.respawn_samples,
        ms(e.respawn_p50_us),
        ms(e.respawn_p99_us),
        ms(e.respawn_max_us)
    );
    let _ = writeln!(
        out,
        "| the same, every worker by exec (WASMBOX_ZYGOTE=false), side by side, p50 / p99 | {} / {} ms |",
        ms(e.respawn_exec_p50_us),
        ms(e.respawn_exec_p99_us)
    );
    let _ = writeln!(
        out,
        "| tenant switch (request for a tenant no idle worker serves, to its answer), a spare ready, p50 / p99 of {}: zygote / exec | {} / {} ms, {} / {} ms |",
        e.switch_samples,
        ms(e.switch_ready_p50_us),
        ms(e.switch_ready_p99_us),
        ms(e.switch_ready_exec_p50_us),
        ms(e.switch_ready_exec_p99_us)
    );
    let _ = writeln!(
        out,
        "| the same, back to back (each right after the last, while its replacement spare starts), p50 / p99 of {}: zygote / exec | {} / {} ms, {} / {} ms |",
        e.switch_samples,
        ms(e.switch_p50_us),
        ms(e.switch_p99_us),
        ms(e.switch_exec_p50_us),
        ms(e.switch_exec_p99_us)
    );
    let _ = writeln!(
        out,
        "| zygote RSS / of it private | {:.1} / {:.1} MiB |",
        e.zygote_rss_kib as f64 / 1024.0,
        e.zygote_private_kib as f64 / 1024.0
    );
    for m in &e.mixed {
        let _ = writeln!(
            out,
            "| hello round robin over {} functions (one tenant each), 2 connections, WASMBOX_TENANCY={} | {:.0} req/s, p50 {} / p99 {} ms, {} errors |",
            m.functions,
            m.tenancy,
            m.throughput,
            ms(m.p50_us),
            ms(m.p99_us),
            m.errors
        );
    }
    let mib = |kib: &[u64]| kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        out,
        "| idle RSS: supervisor / each worker (after one hello each) | {:.1} MiB / {} MiB |",
        e.supervisor_rss_kib as f64 / 1024.0,
        mib(&e.worker_rss_kib)
    );
    let _ = writeln!(
        out,
        "| of each worker's RSS, pages no other process maps (the rest is shared code) | {} MiB |",
        mib(&e.worker_private_kib)
    );
    let _ = writeln!(
        out,
        "| hello mean latency, one connection: cgroups {} / off | {:.0} / {:.0} us (difference {:+.0} us per invocation) |",
        if e.cgroups_active { "on" } else { "requested but unavailable" },
        e.hello_mean_cgroups_us,
        e.hello_mean_no_cgroups_us,
        e.hello_mean_cgroups_us - e.hello_mean_no_cgroups_us
    );
    out.push('\n');
    sessions(&mut out, &e.sessions);
    let _ = writeln!(out, "## Latency\n\n![latency by percentile]({svg_name})");
    out
}

const COLORS: [RGBColor; 4] =
    [RGBColor(200, 40, 40), RGBColor(30, 90, 200), RGBColor(120, 120, 120), RGBColor(40, 150, 60)];

/// Latency by percentile, one panel per scenario, one line per mode (log scale).
pub fn plot(r: &Results, path: &Path) -> anyhow::Result<()> {
    let panels = r.scenarios.len().max(1);
    let cols = 2usize.min(panels);
    let rows = panels.div_ceil(cols);
    let root = SVGBackend::new(path, (560 * cols as u32, 360 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((rows, cols));
    for (scenario, area) in r.scenarios.iter().zip(areas) {
        let cells: Vec<&Cell> = r.closed.iter().filter(|c| c.scenario == scenario.key).collect();
        let curves: Vec<(Mode, Vec<(f64, f64)>)> = cells
            .iter()
            .map(|c| {
                let points = c.recorder.percentile_curve().into_iter().map(|(p, us)| (p, us as f64 / 1000.0)).collect();
                (c.mode, points)
            })
            .filter(|(_, pts): &(Mode, Vec<(f64, f64)>)| !pts.is_empty())
            .collect();
        let max = curves.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(0.01f64, f64::max);
        let min = curves.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(max, f64::min).max(0.001);
        let mut chart = ChartBuilder::on(&area)
            .caption(scenario.key, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..4f64, (min * 0.8..max * 1.25).log_scale())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(5)
            .x_label_formatter(&|v| match v.round() as i32 {
                0 => "0".into(),
                1 => "90".into(),
                2 => "99".into(),
                3 => "99.9".into(),
                _ => "99.99".into(),
            })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (mode, points) in curves {
            let color = COLORS[Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0)];
            // x: number of nines, so p90 is 1, p99 is 2 and the tail gets its room.
            let line = points.into_iter().map(|(p, y)| (-(1.0 - p / 100.0).max(1e-4).log10(), y));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(mode.title())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::stats::Recorder;
    use crate::suite::{Plan, Scenario};

    fn cell(scenario: &'static str, mode: Mode, throughput: f64, p50_us: u64, p99_us: u64) -> Cell {
        let mut recorder = Recorder::default();
        recorder.record(Duration::from_micros(p50_us));
        recorder.record(Duration::from_micros(p99_us));
        let summary = Summary {
            requests: 100,
            throughput,
            p50_us,
            p90_us: p99_us,
            p99_us,
            p999_us: p99_us,
            max_us: p99_us,
            errors: if mode == Mode::SpawnPerRequest { vec![("502".into(), 2), ("none".into(), 1)] } else { vec![] },
        };
        let cpu = match mode {
            Mode::WasmBox => Some(CpuPerRequest { server_us: 100.0, children_us: 60.4 }),
            Mode::InProcess => Some(CpuPerRequest { server_us: 45.6, children_us: 0.0 }),
            _ => None,
        };
        Cell { scenario, mode, summary, cpu, recorder }
    }

    fn results() -> Results {
        let hello = Scenario::all().into_iter().find(|s| s.key == "hello").unwrap();
        Results {
            plan: Plan::quick(),
            machine: Machine {
                cpu: "Test CPU".into(),
                cores: 2,
                memory_gib: 24.0,
                kernel: "6.1".into(),
                cgroup: "v1".into(),
            },
            modes: Mode::ALL.to_vec(),
            workers: 2,
            engine: "wasmtime".into(),
            scenarios: vec![hello],
            closed: vec![
                cell("hello", Mode::WasmBox, 800.0, 1000, 2000),
                cell("hello", Mode::InProcess, 1000.0, 800, 1000),
                cell("hello", Mode::SpawnPerRequest, 40.0, 20_000, 150_000),
                cell("hello", Mode::PlainHttp, 0.0, 50, 100),
            ],
            open: vec![],
            open_skipped: BTreeMap::from([("(c) spawn per request".to_string(), "too slow".to_string())]),
            extras: crate::extras::Extras {
                cold_samples: 5,
                cold_warm_cache_p99_us: 3020,
                sessions: sessions(),
                ..Default::default()
            },
            wall: Duration::from_secs(30),
        }
    }

    fn sessions() -> Sessions {
        use crate::sessions::{Heap, Quantiles, Step};
        let q = |p50_us, p99_us| Quantiles { p50_us, p99_us };
        let heap = Heap {
            heap_mib: 16,
            messages: 10,
            snapshot_bytes: 8_518_864,
            pages_restored: 258,
            pages_compressed: 4,
            restore: q(13_663, 15_000),
            capture: q(11_823, 12_000),
            commit: q(19_599, 40_000),
            state: q(43_743, 63_903),
            exec: q(30_000, 40_000),
            touch: q(59_359, 91_583),
            hello: q(521, 900),
            touch_to_hello: ratio(59_359.0, 521.0),
            fill: Step {
                latency_us: 79_359,
                exec_us: 40_000,
                restore_us: 63,
                capture_us: 34_913,
                commit_us: 20_051,
                snapshot_bytes: 8_518_701,
                pages_restored: 1,
                pages_compressed: 258,
            },
        };
        Sessions { state_filesystem: "ext4".into(), cgroups_active: true, heaps: vec![heap] }
    }

    #[test]
    fn the_sessions_tables_have_a_row_per_heap() {
        let md = markdown(&results(), "x.svg");
        assert!(md.contains("sent, 10 times, a stateless hello"), "{md}");
        assert!(md.contains("fsync of the directory, on ext4)"), "{md}");
        assert!(
            md.contains("| 16 | 8518864 | 13663 | 11823 | 19599 | 43743 / 63903 | 59359 / 91583 | 521 | 113.93x |"),
            "{md}"
        );
        assert!(md.contains("| 16 | 8518701 | 258 | 63 | 34913 | 20051 | 79359 |"), "{md}");
        // Before the plot; and the standalone report has the same tables.
        assert!(md.find("## Sessions") < md.find("## Latency"), "{md}");
        let alone = crate::sessions::Results {
            plan: Plan::full(),
            machine: results().machine,
            workers: 2,
            engine: "wasmtime".into(),
            sessions: sessions(),
            wall: Duration::from_secs(90),
        };
        let md_alone = sessions_markdown(&alone);
        assert!(md_alone.starts_with("# WasmBox sessions benchmark: full, engine wasmtime\n"), "{md_alone}");
        assert!(md_alone.contains("Machine: Test CPU (2 cores), 24.0 GiB, Linux 6.1, cgroup v1. One run, 90 s"));
        assert!(md_alone.contains("2 pre-forked workers, cgroups on."), "{md_alone}");
        let table = |md: &str| md[md.find("## Sessions").unwrap()..].split("## Latency").next().unwrap().to_owned();
        assert_eq!(table(&md_alone), table(&md));
        // No heaps, no section.
        let mut none = results();
        none.extras.sessions.heaps.clear();
        assert!(!markdown(&none, "x.svg").contains("## Sessions"));
    }

    #[test]
    fn the_report_has_the_machine_a_row_per_mode_and_the_ratios() {
        let md = markdown(&results(), "x.svg");
        assert!(md.contains("Machine: Test CPU (2 cores), 24.0 GiB, Linux 6.1, cgroup v1."), "{md}");
        // Server CPU per request, with the workers' share where the mode has workers.
        assert!(md.contains("| (a) WasmBox | 100 | 800 | 1.00 | 2.00 | 2.00 | 2.00 | 0 | 160 (workers 60) |"), "{md}");
        assert!(md.contains("| (b) in-process | 100 | 1000 | 0.80 | 1.00 | 1.00 | 1.00 | 0 | 46 |"), "{md}");
        // Errors are listed by status, with requests that got no answer as "none".
        assert!(
            md.contains("| (c) spawn per request | 100 | 40 | 20.00 | 150 | 150 | 150 | 2 x 502, 1 x none | - |"),
            "{md}"
        );
        // Ratios of (a) to each mode: throughput, p50, p99; a zero baseline gives "-".
        assert!(md.contains("| (a)/(b) | 0.80x | 1.25x | 2.00x |"), "{md}");
        assert!(md.contains("| (a)/(c) | 20.00x | 0.05x | 0.01x |"), "{md}");
        assert!(md.contains("| (a)/(d) | - | 20.00x | 20.00x |"), "{md}");
        assert!(md.contains("(c) spawn per request not run open-loop: too slow."), "{md}");
        assert!(md.contains("artifact in the store, p50 / p99 of 5 | 0.00 / 3.02 ms"), "{md}");
        assert!(md.contains("![latency by percentile](x.svg)"));
    }

    #[test]
    fn the_plot_has_a_line_per_mode() {
        let dir = std::env::temp_dir().join(format!("wasmbox-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        plot(&results(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Each mode: its curve and its legend mark, in its colour; its name in the legend.
        for (mode, color) in Mode::ALL.into_iter().zip(COLORS) {
            let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
            assert_eq!(svg.matches(&stroke).count(), 2, "{}: {stroke}\n{svg}", mode.title());
            assert!(svg.contains(mode.title()), "legend lacks {}", mode.title());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
