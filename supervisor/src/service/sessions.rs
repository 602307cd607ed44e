//! Session operations: create, message, import run a step through the invocation path
//! ([`super::invoke`]) and commit the state it produced; info, delete and export work on the
//! store alone. Each returns what happened; HTTP renders it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmbox_protocol::{Outcome, SessionOp, snapshot};

use super::invoke::{self, Call, Ran, State, Step};
use super::{ServiceError, SessionError};
use crate::App;
use crate::limits::InvocationLimits;
use crate::registry::{Function, FunctionName};
use crate::sessions::{self, Lookup, Session};

/// The export sessions call when the function's config names none.
pub const DEFAULT_HANDLER: &str = "handle";

/// The export a function's session messages go to.
pub fn handler(function: &Function) -> String {
    function.config.session_handler.clone().unwrap_or_else(|| DEFAULT_HANDLER.to_owned())
}

/// A step that ran, and what became of the state it produced.
pub struct Stepped {
    pub ran: Ran,
    /// The state as it is now, when the step succeeded: its size, and how long committing
    /// it took (`None`: the step left it as it was).
    pub commit: Option<Commit>,
    /// The session's id (a new one for `create`).
    pub id: String,
    /// Whether the import made a new session (`false`: replaced an existing one).
    pub created: bool,
    /// The size of the session's committed state after the step.
    pub stored_bytes: u64,
}

impl Stepped {
    /// Whether the guest ran to a clean end (its state is then committed).
    pub fn succeeded(&self) -> bool {
        self.ran.outcome() == Some(&Outcome::Exited { code: 0 })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Commit {
    pub snapshot_bytes: u64,
    pub took: Duration,
}

/// The session `id` of `function`, or why there is none.
pub fn find(app: &App, function: &FunctionName, id: &str) -> Result<Arc<Session>, SessionError> {
    let missing = || SessionError::NotFound { function: function.to_string(), id: id.to_owned() };
    if !sessions::valid_id(id) {
        return Err(missing());
    }
    match app.sessions.lookup(function, id) {
        Lookup::Found(session) => Ok(session),
        Lookup::Expired => Err(expired(app, id)),
        Lookup::Missing => Err(missing()),
    }
}

fn expired(app: &App, id: &str) -> SessionError {
    SessionError::Expired { id: id.to_owned(), idle_secs: app.sessions.limits().idle.map_or(0, |d| d.as_secs()) }
}

/// Locks the session for one operation; fails when it was deleted while waiting.
async fn lock(app: &App, session: &Arc<Session>) -> Result<tokio::sync::OwnedMutexGuard<()>, SessionError> {
    let guard = session.lock.clone().lock_owned().await;
    if session.deleted.load(Ordering::Relaxed) {
        return Err(match app.sessions.lookup(&session.function, &session.id) {
            Lookup::Expired => expired(app, &session.id),
            _ => SessionError::NotFound { function: session.function.to_string(), id: session.id.clone() },
        });
    }
    Ok(guard)
}

/// Runs one step through the invocation path. A state the worker produced is counted
/// against the buffer budget for as long as it is held.
async fn step(
    app: &App,
    function: &Arc<Function>,
    limits: InvocationLimits,
    op: SessionOp,
    state: State<'_>,
    input: Bytes,
    request_id: &str,
) -> Result<Ran, ServiceError> {
    let call = Call {
        request_id,
        function: function.clone(),
        limits,
        args: None,
        input,
        step: Some(Step { op, state }),
        http: None,
    };
    let mut ran = invoke::run(app, call).await?;
    if let Ok(completed) = ran.completed.as_mut() {
        if completed.result.outcome == Outcome::ModuleChanged {
            app.registry.invalidate(&function.name);
            return Err(SessionError::ModuleChanged {
                function: function.name.to_string(),
                saved: function.module.sha256.clone(),
                current: "(replaced during the message)".into(),
            }
            .into());
        }
        let held = app.buffers.charge(completed.snapshot.len() as u64);
        completed.snapshot = Bytes::from_owner(Counted { bytes: std::mem::take(&mut completed.snapshot), _held: held });
    }
    Ok(ran)
}

/// Bytes counted against the budget for as long as they live.
struct Counted {
    bytes: Bytes,
    _held: crate::budget::Held,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The new state of a step that succeeded, checked before it is committed: whole, of
/// this module, within the size limit. Empty: the step left the state as it was.
fn new_state<'a>(app: &App, function: &Function, ran: &'a Ran) -> Result<Option<&'a Bytes>, ServiceError> {
    let Ok(completed) = &ran.completed else { return Ok(None) };
    let bytes = &completed.snapshot;
    if bytes.is_empty() {
        return Ok(None);
    }
    let limit = app.sessions.limits().max_snapshot_bytes;
    if bytes.len() as u64 > limit {
        return Err(SessionError::StateTooLarge { limit }.into());
    }
    snapshot::parse_for(bytes, &function.module.sha256)
        .map_err(|e| ServiceError::Internal(format!("worker produced an unusable snapshot: {e}")))?;
    Ok(Some(bytes))
}

fn store_error(id: &str, e: &std::io::Error) -> ServiceError {
    tracing::error!(session = %sessions::log_id(id), error = %e, "session store i/o failed");
    ServiceError::Internal("cannot write the session's state".into())
}

/// Creates a session: instantiate, `_initialize`, snapshot; the input is the step's stdin.
pub async fn create(
    app: &App,
    function: &Arc<Function>,
    limits: InvocationLimits,
    input: Bytes,
    request_id: &str,
) -> Result<Stepped, ServiceError> {
    let name = &function.name;
    let quota = app.sessions.quota(&function.config);
    let reservation = app.sessions.reserve(name, quota).map_err(SessionError::from)?;
    let ran = step(app, function, limits, SessionOp::Create, State::Fresh, input, request_id).await?;
    let id = sessions::new_id();
    let mut stepped = Stepped { ran, commit: None, id, created: true, stored_bytes: 0 };
    if !stepped.succeeded() {
        return Ok(stepped);
    }
    let state = new_state(app, function, &stepped.ran)?.cloned().unwrap_or_default();
    let growth = app.sessions.grow(name, 0, state.len() as u64, quota).map_err(SessionError::from)?;
    let started = Instant::now();
    app.sessions.write(name, &stepped.id, state.clone()).await.map_err(|e| store_error(&stepped.id, &e))?;
    let took = started.elapsed();
    growth.keep();
    app.sessions.insert(reservation, name, &stepped.id, state.len() as u64);
    stepped.commit = Some(Commit { snapshot_bytes: state.len() as u64, took });
    stepped.stored_bytes = state.len() as u64;
    Ok(stepped)
}

/// Delivers one message to `session` (one at a time per session); the new state is
/// committed only when the message succeeded.
pub async fn message(
    app: &App,
    session: &Arc<Session>,
    function: &Arc<Function>,
    limits: InvocationLimits,
    input: Bytes,
    request_id: &str,
) -> Result<Stepped, ServiceError> {
    let _guard = lock(app, session).await?;
    session.touch();
    let old_size = session.snapshot_bytes.load(Ordering::Relaxed);
    let ran = step(app, function, limits, SessionOp::Message, State::Stored(session), input, request_id).await?;
    let mut stepped = Stepped { ran, commit: None, id: session.id.clone(), created: false, stored_bytes: old_size };
    if !stepped.succeeded() {
        return Ok(stepped);
    }
    let Some(state) = new_state(app, function, &stepped.ran)?.cloned() else {
        return Ok(stepped);
    };
    let quota = app.sessions.quota(&function.config);
    let growth = app.sessions.grow(&function.name, old_size, state.len() as u64, quota).map_err(SessionError::from)?;
    let started = Instant::now();
    app.sessions.write(&function.name, &session.id, state.clone()).await.map_err(|e| store_error(&session.id, &e))?;
    let took = started.elapsed();
    growth.keep();
    session.snapshot_bytes.store(state.len() as u64, Ordering::Relaxed);
    stepped.commit = Some(Commit { snapshot_bytes: state.len() as u64, took });
    stepped.stored_bytes = state.len() as u64;
    Ok(stepped)
}

/// The size of `session`'s committed state now.
pub fn stored_bytes(session: &Session) -> u64 {
    session.snapshot_bytes.load(Ordering::Relaxed)
}

/// Reads the session's committed state and checks it belongs to the function's module as
/// it is now.
pub(super) async fn load(app: &App, session: &Session, function: &Function) -> Result<Bytes, SessionError> {
    let state = app.sessions.read(session).await.map_err(|e| {
        tracing::error!(session = %sessions::log_id(&session.id), error = %e, "cannot read session state");
        SessionError::Corrupt { id: session.id.clone(), reason: format!("cannot read it: {e}") }
    })?;
    match snapshot::parse(&state) {
        Ok(parsed) if parsed.module_hex() != function.module.sha256 => Err(SessionError::ModuleChanged {
            function: function.name.to_string(),
            saved: parsed.module_hex(),
            current: function.module.sha256.clone(),
        }),
        Ok(_) => Ok(state),
        Err(e) => Err(SessionError::Corrupt { id: session.id.clone(), reason: e.to_string() }),
    }
}

/// What the server knows of a session.
#[derive(Debug, serde::Serialize)]
pub struct Info {
    pub id: String,
    pub function: String,
    pub snapshot_bytes: u64,
    pub last_used_unix_ms: u64,
    pub expires_unix_ms: Option<u64>,
}

pub fn info(app: &App, name: &FunctionName, id: &str) -> Result<Info, SessionError> {
    let session = find(app, name, id)?;
    let idle = app.sessions.limits().idle;
    Ok(Info {
        id: session.id.clone(),
        function: name.to_string(),
        snapshot_bytes: stored_bytes(&session),
        last_used_unix_ms: session.last_used_ms(),
        expires_unix_ms: idle.map(|d| session.last_used_ms() + d.as_millis() as u64),
    })
}

pub async fn delete(app: &App, name: &FunctionName, id: &str) -> Result<(), ServiceError> {
    let session = find(app, name, id)?;
    let _guard = lock(app, &session).await?;
    app.sessions.remove(&session).await.map_err(|e| store_error(id, &e))?;
    tracing::info!(function = %name, session = %sessions::log_id(id), "session deleted");
    Ok(())
}

/// An exported state and the module it belongs to.
pub struct Exported {
    pub state: Bytes,
    pub module_sha256: String,
    /// Counted against the buffer budget until the response drops it.
    pub budget: crate::budget::Held,
}

pub async fn export(app: &App, name: &FunctionName, id: &str) -> Result<Exported, ServiceError> {
    let session = find(app, name, id)?;
    let _guard = lock(app, &session).await?;
    // Counted before it is read.
    let budget = app.buffers.take(stored_bytes(&session)).await.map_err(|_| ServiceError::Overloaded)?;
    let corrupt = |reason: String| SessionError::Corrupt { id: id.to_owned(), reason };
    let state = app.sessions.read(&session).await.map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    let module_sha256 = snapshot::parse(&state).map_err(|e| corrupt(e.to_string()))?.module_hex();
    Ok(Exported { state, module_sha256, budget })
}

/// Imports a snapshot as session `id` (creating or replacing it), after checking that it
/// is whole, within the limits, of this function's module, and restorable (a worker
/// restores it without running anything). On any failure nothing changes.
pub async fn import(
    app: &App,
    function: &Arc<Function>,
    limits: InvocationLimits,
    id: &str,
    state: Bytes,
    request_id: &str,
) -> Result<Stepped, ServiceError> {
    if !sessions::valid_id(id) {
        return Err(SessionError::SnapshotInvalid(format!(
            "session id {id:?} is not 32 lowercase hex digits (as the server makes them)"
        ))
        .into());
    }
    let name = &function.name;
    snapshot::parse_for(&state, &function.module.sha256).map_err(|e| SessionError::SnapshotInvalid(e.to_string()))?;
    let quota = app.sessions.quota(&function.config);
    let given = State::Given(state.clone());
    let ran = step(app, function, limits, SessionOp::Check, given, Bytes::new(), request_id).await?;
    let mut stepped = Stepped { ran, commit: None, id: id.to_owned(), created: false, stored_bytes: 0 };
    if !stepped.succeeded() {
        return Ok(stepped);
    }
    let size = state.len() as u64;
    match app.sessions.lookup(name, id) {
        Lookup::Found(session) => {
            let _guard = lock(app, &session).await?;
            let growth = app.sessions.grow(name, stored_bytes(&session), size, quota).map_err(SessionError::from)?;
            app.sessions.write(name, id, state).await.map_err(|e| store_error(id, &e))?;
            growth.keep();
            session.snapshot_bytes.store(size, Ordering::Relaxed);
            session.touch();
        }
        _ => {
            // An expired session the sweep has not removed yet: it goes now, as the sweep
            // would remove it (under its lock, so the two never race on the file), and the
            // import makes a new session of the id.
            if let Some(stale) = app.sessions.expired_entry(name, id) {
                let _guard = stale.lock.clone().lock_owned().await;
                if !stale.deleted.load(Ordering::Relaxed) {
                    app.sessions.remove(&stale).await.map_err(|e| store_error(id, &e))?;
                }
            }
            if app.sessions.exists_elsewhere(name, id) {
                return Err(
                    SessionError::SnapshotInvalid(format!("session id {id} belongs to another function")).into()
                );
            }
            let reservation = app.sessions.reserve(name, quota).map_err(SessionError::from)?;
            let growth = app.sessions.grow(name, 0, size, quota).map_err(SessionError::from)?;
            app.sessions.write(name, id, state).await.map_err(|e| store_error(id, &e))?;
            growth.keep();
            app.sessions.insert(reservation, name, id, size);
            stepped.created = true;
        }
    }
    stepped.commit = Some(Commit { snapshot_bytes: size, took: Duration::ZERO });
    stepped.stored_bytes = size;
    Ok(stepped)
}
