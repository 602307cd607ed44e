//! What the supervisor does for a request, apart from HTTP: the layer between a parsed
//! request (`http::request`) and its rendered answer. Each operation runs against the
//! pool, the registry, the compiler, the session store and the cgroups, and returns a
//! domain result or a [`ServiceError`]; HTTP maps those to responses in one place.
//!
//! - [`invoke`]: the invocation path, the one way anything runs on a worker.
//! - [`sessions`]: session steps (through [`invoke`]) and the session store.
//! - [`admin`]: module management.

pub mod admin;
mod error;
pub mod invoke;
pub mod sessions;

pub use error::{ServiceError, SessionError};
