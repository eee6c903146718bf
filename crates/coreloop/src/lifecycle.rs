//! [`Worker`]: what a worker's setup ([`ServerBuilder::serve_with`]) is given, to prepare
//! per-worker state and to take part in the worker's drain.
//!
//! Each worker process runs the setup once, inside its runtime, before it tells the
//! supervisor it is ready; the handler the setup returns serves every connection of that
//! worker. The setup can also start background tasks that stop when the worker drains
//! ([`Worker::shutdown_signal`]), and register drain hooks ([`Worker::on_drain`]), which the
//! worker awaits before it exits.
//!
//! [`ServerBuilder::serve_with`]: crate::ServerBuilder::serve_with

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::error::BoxError;
use crate::handler::WorkerId;
use crate::shutdown::ShutdownSignal;

/// The per-worker setup, boxed once: it runs once per worker process.
pub(crate) type Factory<H> =
    Box<dyn Fn(Worker) -> Pin<Box<dyn Future<Output = Result<H, BoxError>>>>>;

/// A drain hook, boxed once when registered.
pub(crate) type DrainHook = Pin<Box<dyn Future<Output = ()>>>;

/// The drain hooks registered so far, taken by the worker when it drains.
#[derive(Default)]
pub(crate) struct DrainHooks(RefCell<Vec<DrainHook>>);

impl DrainHooks {
    /// The hooks registered since the last call, in registration order.
    pub(crate) fn take(&self) -> Vec<DrainHook> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// The worker process a setup runs in: its id, its shutdown signal, and its drain hooks.
/// Given to the setup of [`ServerBuilder::serve_with`](crate::ServerBuilder::serve_with).
///
/// Cheap to clone, and not `Send`: like the handler, it lives on the worker's one thread.
///
/// # Examples
///
/// ```no_run
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use std::time::Duration;
/// use coreloop::{Conn, Server, Worker};
/// use tokio::io::AsyncWriteExt;
///
/// fn main() -> Result<(), coreloop::Error> {
///     Server::builder()
///         .bind("127.0.0.1:7000")?
///         .serve_with(|worker: Worker| async move {
///             // Per-worker state, prepared before the worker takes connections.
///             let served = Rc::new(Cell::new(0u64));
///             // A background task that stops when the worker drains.
///             let draining = worker.shutdown_signal();
///             tokio::task::spawn_local(async move {
///                 loop {
///                     tokio::select! {
///                         () = tokio::time::sleep(Duration::from_secs(1)) => { /* refresh */ }
///                         () = draining.triggered() => return,
///                     }
///                 }
///             });
///             // Awaited when the worker drains, before it exits.
///             let total = Rc::clone(&served);
///             let id = worker.id();
///             worker.on_drain(async move {
///                 eprintln!("worker {id} served {} connections", total.get());
///             });
///             Ok::<_, std::io::Error>(move |mut conn: Conn| {
///                 served.set(served.get() + 1);
///                 async move { conn.stream_mut().write_all(b"hello\n").await }
///             })
///         })
///         .run()
/// }
/// ```
#[derive(Clone)]
pub struct Worker {
    id: WorkerId,
    shutdown: ShutdownSignal,
    hooks: Rc<DrainHooks>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("draining", &self.shutdown.is_triggered())
            .finish_non_exhaustive()
    }
}

impl Worker {
    pub(crate) fn new(id: WorkerId, shutdown: ShutdownSignal, hooks: Rc<DrainHooks>) -> Self {
        Self {
            id,
            shutdown,
            hooks,
        }
    }

    /// This worker's slot, `0..workers`; a replacement keeps its predecessor's.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// The worker's shutdown signal, the one every [`Conn`](crate::Conn) of this worker
    /// carries: triggered when the worker starts draining. Background tasks the setup
    /// spawns (`tokio::task::spawn_local`) await it to stop in time.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        self.shutdown.clone()
    }

    /// Registers `hook`, run when the worker drains: after it has stopped taking new
    /// connections and triggered its [shutdown signal](Self::shutdown_signal), while its
    /// connections finish. The worker exits once the hooks and the connections are done,
    /// or when the shutdown timeout expires, whichever comes first; a hook still running
    /// then is dropped. Hooks run concurrently, each as its own task: a hook that panics
    /// is logged and does not stop the others. A hook registered during the drain (by
    /// another hook, say) runs too.
    ///
    /// Use it to flush per-worker state, close a pool, or wait for background tasks.
    pub fn on_drain(&self, hook: impl Future<Output = ()> + 'static) {
        self.hooks.0.borrow_mut().push(Box::pin(hook));
    }
}
