//! WASI 0.2 components on Wasmtime. What a component is comes from its exports when it is
//! linked: `wasi:cli/run` makes it a `wasi:cli/command`, which runs exactly like a command
//! module (stdin, argv, env, preopens, exit code, the same limits and deadline); anything
//! else is refused with what it exports.

use std::time::Instant;

use wasmbox_protocol::Outcome;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{Limits, WasmtimeEngine, classify_with};
use crate::capture::Capture;
use crate::engine::{EngineError, RunRequest, bounded};

/// Per-invocation store data of a component.
pub(super) struct ComponentState {
    ctx: WasiCtx,
    table: ResourceTable,
    pub(super) limits: Limits,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

/// A component linked for what it is.
#[derive(Clone)]
pub(super) enum Linked {
    Command(CommandPre<ComponentState>),
}

/// The WASI 0.2 linker: every `wasi:cli/command` import (`exit-with-code` of 0.2.12
/// included, so a guest that imports it gets its exit status through as it gave it).
pub(super) fn linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<ComponentState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    Ok(linker)
}

/// Names of a component's exports, for messages.
fn export_names(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    component.component_type().exports(engine).map(|(name, _)| name.to_owned()).collect()
}

/// Whether an export name is interface `interface` of WASI 0.2 (any patch version).
fn is_wasi_02(name: &str, interface: &str) -> bool {
    name.strip_prefix(interface).and_then(|rest| rest.strip_prefix("@0.2.")).is_some()
}

/// Links `component` for the world it exports.
pub(super) fn link(linker: &Linker<ComponentState>, component: &Component) -> Result<Linked, EngineError> {
    let exports = export_names(linker.engine(), component);
    let invalid = |message: String| EngineError::InvalidModule(bounded(message));
    if exports.iter().any(|n| is_wasi_02(n, "wasi:cli/run")) {
        let pre = linker.instantiate_pre(component).map_err(|e| invalid(format!("{e:#}")))?;
        let command = CommandPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?;
        return Ok(Linked::Command(command));
    }
    if exports.iter().any(|n| is_wasi_02(n, "wasi:http/incoming-handler")) {
        return Err(invalid(
            "a wasi:http/proxy component (it exports wasi:http/incoming-handler); this server runs WASI 0.2 \
             components of the wasi:cli/command world"
                .into(),
        ));
    }
    Err(invalid(format!(
        "a WebAssembly component that exports neither wasi:cli/run@0.2 (a wasi:cli/command) nor \
         wasi:http/incoming-handler@0.2 (a wasi:http/proxy); its exports: [{}]",
        exports.join(", ")
    )))
}

impl WasmtimeEngine {
    /// Runs a `wasi:cli/command` component's `run` in a fresh store with fresh WASI state.
    pub(super) fn run_command_component(
        &self,
        command: &CommandPre<ComponentState>,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Outcome {
        let mut wasi = match super::wasi_builder(request, stdout, stderr) {
            Ok(wasi) => wasi,
            Err(outcome) => return outcome,
        };
        let memory_bytes = usize::try_from(request.memory_limit_bytes).unwrap_or(usize::MAX);
        let state =
            ComponentState { ctx: wasi.build(), table: ResourceTable::new(), limits: Limits::component(memory_bytes) };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        let guard = self.watchdog.arm(Instant::now() + request.timeout);
        let result = command.instantiate(&mut store).and_then(|c| c.wasi_cli_run().call_run(&mut store));
        let fired = guard.disarm();
        match result {
            Ok(Ok(())) => Outcome::Exited { code: 0 },
            // `exit(err)` comes back as an exit trap; a `run` that returns `err` is the same.
            Ok(Err(())) => Outcome::Exited { code: 1 },
            Err(e) => classify_with(&e, store.data().limits.memory_denied, fired, request.memory_limit_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasi_interfaces_match_any_02_patch_and_nothing_else() {
        assert!(is_wasi_02("wasi:cli/run@0.2.0", "wasi:cli/run"));
        assert!(is_wasi_02("wasi:http/incoming-handler@0.2.12", "wasi:http/incoming-handler"));
        assert!(!is_wasi_02("wasi:cli/run@0.3.0", "wasi:cli/run"));
        assert!(!is_wasi_02("wasi:cli/runner@0.2.0", "wasi:cli/run"));
        assert!(!is_wasi_02("wasi:cli/run", "wasi:cli/run"));
    }
}
