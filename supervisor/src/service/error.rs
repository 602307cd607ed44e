//! What can go wrong executing a request, in the domain's terms. HTTP turns each into its
//! answer in one place (`http::error`).

use crate::compiler::CompileError;
use crate::limits::LimitError;
use crate::pool::AcquireError;
use crate::registry::{FunctionName, RegistryError};
use crate::sessions::QuotaError;

/// Why a request could not be executed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The server is draining: no new work.
    #[error("shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Limits(#[from] LimitError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// A config or preopened directory the server refuses (the log says why; the caller
    /// hears only which function).
    #[error("function {0}'s config or preopened directories are not acceptable")]
    InvalidConfig(FunctionName),
    /// The module is not something this server can run (kind or engine).
    #[error("{0}")]
    Unsupported(String),
    /// The bytes held for clients are spent (`WASMBOX_MAX_BUFFERED_BYTES`).
    #[error("the buffer budget is spent")]
    Overloaded,
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A function's config the server refused, with the reason (for the operator).
    #[error("invalid function config: {0}")]
    ConfigRefused(String),
    /// Something on the server's side failed; the message is safe to show (details are
    /// logged where they happened).
    #[error("{0}")]
    Internal(String),
}

/// What a session operation can find wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no session {id} of function {function}")]
    NotFound { function: String, id: String },
    #[error("session {id} expired")]
    Expired { id: String, idle_secs: u64 },
    #[error("session state belongs to another module")]
    ModuleChanged { function: String, saved: String, current: String },
    #[error("session {id}'s stored state is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    /// A new state larger than `WASMBOX_SESSION_MAX_SNAPSHOT_BYTES`.
    #[error("session state too large")]
    StateTooLarge { limit: u64 },
    /// An imported snapshot that is not acceptable.
    #[error("invalid snapshot: {0}")]
    SnapshotInvalid(String),
    /// An imported snapshot larger than `WASMBOX_SESSION_MAX_SNAPSHOT_BYTES`.
    #[error("snapshot too large")]
    SnapshotTooLarge { limit: u64 },
    #[error(transparent)]
    Quota(#[from] QuotaError),
}
