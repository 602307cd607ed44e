//! Closed-loop clients that keep a server under steady load until stopped, counting every
//! request and keeping every failure (a non-200 answer or no answer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::Client;

/// `clients` tasks, each sending `POST path` (with `headers`) one after another, at most
/// `per_client` times, until [`Load::finish`].
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(client: &Client, clients: usize, per_client: usize, path: &str, headers: &[(&str, &str)]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let tasks = (0..clients)
            .map(|i| {
                let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
                let (path, headers) = (path.to_string(), headers.clone());
                tokio::spawn(async move {
                    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let mut failures = Vec::new();
                    for n in 0..per_client {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let body = Bytes::from(format!("client {i} request {n}"));
                        match client.request(Method::POST, &path, &headers, body).await {
                            Ok(r) if r.status == StatusCode::OK => {}
                            Ok(r) => failures.push(format!("{}: {}", r.status, r.text())),
                            Err(e) => failures.push(format!("transport: {e:#}")),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Load { stop, done, tasks }
    }

    /// Requests answered (or failed) so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the clients; the requests sent and the failures among them.
    pub async fn finish(self) -> Result<(usize, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.context("client task")?);
        }
        Ok((self.done.load(Ordering::Relaxed), failures))
    }
}
