//! Sharded acceptors: the supervisor's accept loops, one on its main thread and one on each
//! extra thread, each with its own listening sockets and its own dispatcher on the shared
//! load picture ([`Board`]). One core accepting for every worker is the supervisor's
//! ceiling on a many-core machine; with `K` loops, `K` cores accept and forward.
//!
//! Which sockets a loop accepts on ([`assign`]): a TCP listener bound with `K`
//! `SO_REUSEPORT` siblings gives one to each loop, and the kernel spreads new connections
//! over them by a hash of their addresses. A listener with fewer sockets than loops (a
//! socket passed by systemd, one handed over by a generation without siblings) is shared:
//! every loop without a socket of its own accepts on a duplicate of the first, so every
//! loop wakes for its connections and one takes each. Unix listeners stay on the main loop.
//!
//! This module starts the loops, turns them off for a binary upgrade's handover (each
//! returns its sockets once what it accepted is queued to a worker), starts them again on
//! the same sockets if the handover does not happen, and stops them with the server the
//! same way, closing the sockets they return.

use std::sync::Arc;

use tracing::{Instrument, error};

use super::{Counters, Source, Switch, accept_loop, register};
use crate::dispatch::{Board, Shard};
use crate::error::Error;
use crate::listener::{self, Bound};
use crate::metrics::{AcceptorLabels, ListenerLabels, Metrics};

/// The sockets of each accept loop, the main thread's first.
pub(crate) type Assignment = Vec<Vec<Bound>>;

/// The running accept loops.
pub(crate) struct Acceptors {
    /// The main thread's loop, a local task.
    main: (Arc<Switch>, tokio::task::JoinHandle<Vec<Bound>>),
    /// The loops on their own threads: each one's switch and where it returns its sockets.
    threads: Vec<(Arc<Switch>, tokio::sync::oneshot::Receiver<Vec<Bound>>)>,
    board: Arc<Board>,
}

/// What starting the loops needs from the supervisor.
pub(crate) struct Start<'a> {
    pub(crate) board: &'a Arc<Board>,
    pub(crate) metrics: &'a Metrics,
    pub(crate) span: &'a tracing::Span,
    /// Seeds the dispatchers' randomness (each loop's its own).
    pub(crate) seed: u64,
}

impl Acceptors {
    /// Starts one accept loop per set of sockets: the first on this thread (its sockets
    /// already registered with this runtime when `registered`), the others each on a
    /// thread of its own with its own `current_thread` runtime.
    ///
    /// # Errors
    ///
    /// When a thread or its runtime cannot be created: the server does not start (the
    /// supervisor returns the error, and its process ends with the loops it started).
    pub(crate) fn start(
        start: Start<'_>,
        mut sets: Assignment,
        registered: Option<Vec<listener::Listener>>,
    ) -> Result<Self, Error> {
        let rest = sets.split_off(1.min(sets.len()));
        let first = sets.pop().unwrap_or_default();
        let main_sources = match registered {
            Some(listeners) => Source::registered(listeners),
            None => Source::unregistered(first),
        };
        let seed = |id: usize| start.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let switch = Arc::new(Switch::new());
        let task = tokio::task::spawn_local(
            accept_loop(
                Shard::new(Arc::clone(start.board), seed(0)),
                Arc::clone(&switch),
                counters(start.metrics, 0, &main_sources),
                main_sources,
            )
            .instrument(start.span.clone()),
        );
        let mut acceptors = Self {
            main: (switch, task),
            threads: Vec::with_capacity(rest.len()),
            board: Arc::clone(start.board),
        };
        for (i, set) in rest.into_iter().enumerate() {
            let id = i + 1;
            let sources = Source::unregistered(set);
            let counters = counters(start.metrics, id, &sources);
            let shard = Shard::new(Arc::clone(start.board), seed(id));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::Runtime)?;
            let switch = Arc::new(Switch::new());
            let (done, returned) = tokio::sync::oneshot::channel();
            let (started, set_up) = std::sync::mpsc::sync_channel(1);
            let span = tracing::info_span!(parent: start.span, "acceptor", acceptor = id);
            let loop_switch = Arc::clone(&switch);
            std::thread::Builder::new()
                .name(format!("coreloop-acceptor-{id}"))
                .spawn(move || {
                    let accept = async {
                        // Inside the runtime, before the server says it serves (as the
                        // main loop's): the listeners registered, the loop's timer made.
                        let mut sources = sources;
                        register(&mut sources);
                        let accept = accept_loop(shard, loop_switch, counters, sources);
                        let _ = started.send(());
                        accept.await
                    };
                    let sockets = runtime.block_on(accept.instrument(span));
                    // The main task may have stopped waiting (the server stops): the
                    // sockets close here then.
                    let _ = done.send(sockets);
                })
                .map_err(Error::Runtime)?;
            // A loop that could not set up has ended: its sockets come back through
            // `returned` like any loop's.
            let _ = set_up.recv();
            acceptors.threads.push((switch, returned));
        }
        Ok(acceptors)
    }

    /// Turns every loop off and waits for each to queue what it accepted and return its
    /// sockets. A loop whose thread died returns none.
    pub(crate) async fn hand_back(self) -> Assignment {
        self.main.0.turn_off();
        for (switch, _) in &self.threads {
            switch.turn_off();
        }
        // Whether a loop waits for a listener or for a worker with room.
        self.board.changed.notify_waiters();
        let mut sets = Vec::with_capacity(1 + self.threads.len());
        sets.push(self.main.1.await.unwrap_or_default());
        for (_, returned) in self.threads {
            sets.push(returned.await.unwrap_or_else(|_| {
                error!("an accept loop ended without returning its sockets");
                Vec::new()
            }));
        }
        sets
    }

    /// Stops every loop and closes its sockets, as a handover would (see
    /// [`Acceptors::hand_back`]): each loop first queues what it accepted to a worker with
    /// room. The server is stopping, so no loop waits for room; its workers are sent
    /// `Drain` only after this.
    pub(crate) async fn stop(self) {
        drop(self.hand_back().await);
    }
}

/// The counters of accept loop `id`, whose listeners are `sources`.
fn counters(metrics: &Metrics, id: usize, sources: &[Source]) -> Counters {
    let listener = |source: &Source| {
        let labels = ListenerLabels {
            listener: source.bound.label.clone(),
        };
        (
            metrics.accepted.get_or_create_owned(&labels),
            metrics.accept_errors.get_or_create_owned(&labels),
        )
    };
    Counters {
        listeners: sources.iter().map(listener).collect(),
        acceptor: metrics
            .acceptor_accepted
            .get_or_create_owned(&AcceptorLabels {
                acceptor: id as u32,
            }),
        poll_interval: if id == 0 {
            metrics.accept_poll_interval.clone()
        } else {
            Default::default()
        },
    }
}

/// Spreads the sockets of every accepting listener over `k` accept loops (see the module
/// documentation): each TCP listener's siblings one per loop, a listener with too few
/// shared by duplicates, unix listeners on the main loop. Duplicates carry no socket file.
pub(crate) fn assign(bound: Vec<Bound>, k: usize) -> Assignment {
    let k = k.max(1);
    let mut sets: Assignment = (0..k).map(|_| Vec::new()).collect();
    let mut by_listener: Vec<(u16, Vec<Bound>)> = Vec::new();
    for b in bound {
        match by_listener.iter_mut().find(|(index, _)| *index == b.index) {
            Some((_, group)) => group.push(b),
            None => by_listener.push((b.index, vec![b])),
        }
    }
    for (_, group) in by_listener {
        let tcp = group.iter().all(Bound::is_tcp);
        let n = group.len();
        // The loops past the last socket share the first (a loop without one accepts on
        // none of this listener's, should a duplicate fail).
        let shared: Vec<Option<Bound>> = if tcp {
            (n..k).map(|_| group[0].duplicate().ok()).collect()
        } else {
            Vec::new()
        };
        for (j, b) in group.into_iter().enumerate() {
            let to = if tcp { j % k } else { 0 };
            sets[to].push(b);
        }
        for (set, dup) in sets.iter_mut().skip(n).zip(shared) {
            set.extend(dup);
        }
    }
    sets
}
