//! The threaded engine: [`EngineCore`] stepping on its own std thread, requests in through a
//! command channel, token events out through one channel per request.
//!
//! `Engine` is `Send + Sync`: share it as `Arc<Engine>`; every method takes `&self` and never
//! blocks on the engine thread except [`Engine::shutdown`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use r1serve_model::{CausalLm, ModelInfo};
use tracing::{debug, info, warn};

use crate::config::{EngineConfig, Limits};
use crate::engine_core::{EngineCore, EventReceiver, EventSender};
use crate::error::EngineError;
use crate::generate::FinishReason;
use crate::metrics::EngineStats;
use crate::sequence::{Request, SeqId, TokenEvent, Usage};

/// What [`Engine::shutdown`] does with requests in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Stop accepting requests, finish every queued and running one, then stop.
    Drain,
    /// Finish every request now with `FinishReason::Abort`, then stop.
    Abort,
}

enum Command {
    Add {
        id: SeqId,
        request: Box<Request>,
        sink: EventSender,
    },
    Finish {
        id: SeqId,
        reason: FinishReason,
    },
    Force {
        id: SeqId,
        tokens: Vec<u32>,
    },
    Shutdown(ShutdownMode),
}

struct Shared {
    stats: Arc<Mutex<EngineStats>>,
    accepting: AtomicBool,
}

pub struct Engine {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    limits: Limits,
    info: ModelInfo,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Builds the KV cache for `model` under `config` and starts the engine thread. Fails on a
    /// configuration that cannot work (a zero limit, a cache too small for one block).
    pub fn start(model: Arc<dyn CausalLm>, config: EngineConfig) -> Result<Self, EngineError> {
        let info = model.info().clone();
        let mut core = EngineCore::new(model, &config)?;
        let limits = core.limits().clone();
        let stats = Arc::new(Mutex::new(core.stats()));
        core.publish_stats_to(Arc::clone(&stats));
        let shared = Arc::new(Shared {
            stats,
            accepting: AtomicBool::new(true),
        });
        let (commands, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("r1serve-engine".into())
            .spawn(move || run(core, rx))
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        info!(
            architecture = %info.architecture,
            kv_blocks = limits.num_blocks,
            block_size = limits.block_size,
            max_model_len = limits.max_model_len,
            max_num_seqs = config.max_num_seqs,
            max_num_batched_tokens = config.max_num_batched_tokens,
            prefix_caching = config.enable_prefix_caching,
            "engine started"
        );
        Ok(Self {
            commands,
            shared,
            limits,
            info,
            next_id: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a request. Rejects at once (typed error) a request that is malformed or could
    /// never run: empty prompt, unknown token id, bad sampling parameters, prompt + max_tokens
    /// over the context, or more KV blocks than the whole cache.
    pub fn submit(&self, request: Request) -> Result<(SeqId, EventReceiver), EngineError> {
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown);
        }
        self.limits.check(&request)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sink, events) = tokio::sync::mpsc::unbounded_channel();
        let request = Box::new(request);
        self.commands
            .send(Command::Add { id, request, sink })
            .map_err(|_| EngineError::ShutDown)?;
        Ok((id, events))
    }

    /// Cancels a request: its blocks are freed before the next step and its last event is
    /// `Finished { reason: Abort }`. Unknown or finished ids are ignored. Dropping the event
    /// receiver has the same effect at the request's next token.
    pub fn abort(&self, id: SeqId) {
        self.send(Command::Finish {
            id,
            reason: FinishReason::Abort,
        });
    }

    /// Finishes a request early with `FinishReason::Stop` (the caller matched a stop string).
    pub fn finish(&self, id: SeqId) {
        self.send(Command::Finish {
            id,
            reason: FinishReason::Stop,
        });
    }

    /// Makes a request emit `tokens` next, one per step, instead of sampling (they count toward
    /// `max_tokens`, and stop ids still apply). Ignored if the request already finished.
    pub fn force_tokens(&self, id: SeqId, tokens: Vec<u32>) -> Result<(), EngineError> {
        self.limits.check_tokens(&tokens)?;
        self.commands
            .send(Command::Force { id, tokens })
            .map_err(|_| EngineError::ShutDown)
    }

    /// The latest snapshot (refreshed after every step).
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// Stops accepting requests, drains or aborts the ones in flight, and joins the thread.
    /// Idempotent; also run (with `Abort`) on drop.
    pub fn shutdown(&self, mode: ShutdownMode) {
        self.shared.accepting.store(false, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            self.send(Command::Shutdown(mode));
            if thread.join().is_err() {
                warn!("the engine thread panicked");
            }
        }
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            debug!("engine thread gone: command dropped");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(ShutdownMode::Abort);
    }
}

enum Flow {
    Continue,
    Stop,
}

fn handle(core: &mut EngineCore, command: Command, draining: &mut bool) -> Flow {
    match command {
        Command::Add { id, request, sink } => {
            if let Err(e) = core.add_request(id, *request, sink.clone()) {
                reject(&sink, FinishReason::Error, Some(e.to_string()));
            }
        }
        Command::Finish { id, reason } => {
            core.finish_request(id, reason);
        }
        Command::Force { id, tokens } => {
            if let Err(e) = core.force_tokens(id, &tokens) {
                debug!(id, error = %e, "forced tokens dropped");
            }
        }
        Command::Shutdown(ShutdownMode::Drain) => *draining = true,
        Command::Shutdown(ShutdownMode::Abort) => {
            core.abort_all();
            return Flow::Stop;
        }
    }
    Flow::Continue
}

fn reject(sink: &EventSender, reason: FinishReason, error: Option<String>) {
    let _ = sink.send(TokenEvent::Finished {
        reason,
        usage: Usage::default(),
        error,
    });
}

/// The engine loop: take commands (blocking while idle, with the stats published), step.
fn run(mut core: EngineCore, commands: Receiver<Command>) {
    let mut draining = false;
    'run: loop {
        if !core.has_work() {
            core.publish_stats();
            if draining {
                break;
            }
            let Ok(command) = commands.recv() else { break };
            if let Flow::Stop = handle(&mut core, command, &mut draining) {
                break;
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => {
                    if let Flow::Stop = handle(&mut core, command, &mut draining) {
                        break 'run;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    core.abort_all();
                    break 'run;
                }
            }
        }
        // The step publishes its stats itself, before its `Finished` events.
        core.step();
    }
    // Requests that raced with shutdown: tell them rather than closing their channel silently.
    core.abort_all();
    while let Ok(command) = commands.try_recv() {
        if let Command::Add { sink, .. } = command {
            reject(&sink, FinishReason::Abort, Some("the engine is shutting down".into()));
        }
    }
    core.publish_stats();
    info!("engine stopped");
}
