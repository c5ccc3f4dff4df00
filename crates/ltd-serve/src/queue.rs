//! One generation at a time: a worker thread owns the loaded model and takes jobs from a
//! bounded FIFO queue.
//!
//! The queue holds at most `capacity` waiting jobs besides the running one; a submission past
//! that is refused at once (the HTTP layer answers 503 with `Retry-After`). A job whose
//! client goes away leaves the queue at once (its place is free for the next request) or, if
//! it is running, is cancelled at the next step, as `/interrupt` and shutdown cancel it.
//! Progress and the preview of the running job are published in [`Status`] for `/progress`;
//! a preview is only decoded when `/progress` asked for one since the last step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use base64::Engine as _;
use ltd_cli::{DeviceArgs, ModelArgs};
use ltd_pipeline::{GenerateRequest, GeneratedImage, Pipeline, PipelineError, SamplerKind};
use tokio::sync::oneshot;

/// A model the server can switch to (`/sdapi/v1/sd-models`).
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// The name clients use (`sd_model_checkpoint`), as images record it (`Model:`).
    pub title: String,
    /// How to load it.
    pub args: ModelArgs,
}

/// What the request handlers need to know about the loaded model to check a request before
/// it waits in the queue.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Its title.
    pub title: String,
    /// The default image size.
    pub default_size: (usize, usize),
    /// The VAE's scale factor (sizes must be multiples of it).
    pub scale_factor: usize,
    /// The sampler it ships with.
    pub default_sampler: Option<SamplerKind>,
}

impl LoadedModel {
    fn of(pipe: &Pipeline, title: &str) -> Self {
        Self {
            title: title.to_string(),
            default_size: pipe.default_size(),
            scale_factor: pipe.vae_scale_factor(),
            default_sampler: pipe.default_sampler(),
        }
    }
}

/// What a job asks for.
#[derive(Debug)]
pub enum JobKind {
    /// Runs each request in turn (A1111's `n_iter` batches), on the named model if given.
    Generate {
        /// `override_settings.sd_model_checkpoint`.
        model: Option<String>,
        /// One request per batch.
        requests: Vec<GenerateRequest>,
    },
    /// Loads another model (`POST /sdapi/v1/options`).
    SwitchModel(String),
}

/// A finished job.
#[derive(Debug)]
pub struct Output {
    /// The images of every batch, in order.
    pub images: Vec<GeneratedImage>,
    /// The model that made them.
    pub model: String,
    /// Seconds spent generating (not waiting).
    pub seconds: f64,
}

/// Why a job gave no images.
#[derive(Debug)]
pub enum JobError {
    /// A request value out of range for the model (`field` as ltd-gen's flag).
    Invalid {
        /// ltd-gen's flag name.
        field: &'static str,
        /// ltd-gen's message.
        message: String,
    },
    /// `sd_model_checkpoint` names no model this server knows.
    UnknownModel(String),
    /// Interrupted (`/interrupt`, shutdown or the client gone) after `step` of `total`.
    Interrupted {
        /// Steps done.
        step: usize,
        /// Steps asked for.
        total: usize,
    },
    /// The server is stopping and never ran the job.
    ShuttingDown,
    /// Anything else (loading failed, out of memory…), phrased for the user.
    Failed(String),
}

/// Where a job's answer arrives.
pub type Answer = oneshot::Receiver<Result<Output, JobError>>;

/// A job in the queue.
#[derive(Debug)]
pub struct Job {
    /// The request id it belongs to (for logs and `/progress`).
    pub id: u64,
    kind: JobKind,
    cancel: AtomicBool,
    reply: Mutex<Option<oneshot::Sender<Result<Output, JobError>>>>,
}

impl Job {
    fn answer(&self, result: Result<Output, JobError>) {
        if let Some(tx) = lock(&self.reply).take() {
            let _ = tx.send(result);
        }
    }
}

/// The queue is full.
#[derive(Debug)]
pub enum Refused {
    /// `capacity` jobs already wait.
    Full,
    /// The server is shutting down.
    ShuttingDown,
}

/// `/progress`'s view of the running job.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The running job's request id.
    pub job: Option<u64>,
    /// Jobs running or waiting.
    pub job_count: usize,
    /// The batch (A1111's `job_no`) and the number of batches.
    pub batch: usize,
    /// Batches in the job.
    pub batches: usize,
    /// Steps done in this batch and their number.
    pub step: usize,
    /// Steps in this batch.
    pub steps: usize,
    /// When the job started.
    pub started: Option<Instant>,
    /// The job's start as A1111 writes it (`%Y%m%d%H%M%S`, UTC).
    pub job_timestamp: String,
    /// The last preview, a base64 PNG.
    pub current_image: Option<String>,
    /// Whether the running job was interrupted.
    pub interrupted: bool,
}

struct Waiting {
    jobs: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    shutdown: bool,
}

/// The queue and what the worker publishes.
pub struct Queue {
    waiting: Mutex<Waiting>,
    ready: Condvar,
    capacity: usize,
    next_id: AtomicU64,
    want_preview: AtomicBool,
    status: Mutex<Status>,
    loaded: RwLock<LoadedModel>,
    /// The models clients may switch to.
    pub models: Vec<ModelEntry>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    /// A fresh request id (every request gets one, for the logs).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The loaded model.
    pub fn loaded(&self) -> LoadedModel {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a job at the end of the queue; its answer arrives on the receiver.
    pub fn submit(&self, id: u64, kind: JobKind) -> Result<(Arc<Job>, Answer), Refused> {
        let (tx, rx) = oneshot::channel();
        let job =
            Arc::new(Job { id, kind, cancel: AtomicBool::new(false), reply: Mutex::new(Some(tx)) });
        let mut w = lock(&self.waiting);
        if w.shutdown {
            return Err(Refused::ShuttingDown);
        }
        if w.jobs.len() >= self.capacity {
            return Err(Refused::Full);
        }
        w.jobs.push_back(job.clone());
        lock(&self.status).job_count = w.jobs.len() + usize::from(w.running.is_some());
        drop(w);
        self.ready.notify_one();
        Ok((job, rx))
    }

    /// The client of `job` went away: it leaves the queue, or stops at its next step.
    pub fn abandon(&self, job: &Arc<Job>) {
        let mut w = lock(&self.waiting);
        job.cancel.store(true, Ordering::Relaxed);
        w.jobs.retain(|j| !Arc::ptr_eq(j, job));
        lock(&self.status).job_count = w.jobs.len() + usize::from(w.running.is_some());
    }

    /// Stops the running job at its next step (`/sdapi/v1/interrupt`); waiting jobs go on.
    pub fn interrupt(&self) {
        let w = lock(&self.waiting);
        if let Some(job) = &w.running {
            job.cancel.store(true, Ordering::Relaxed);
            lock(&self.status).interrupted = true;
        }
    }

    /// Refuses new jobs, answers the waiting ones, and stops the running one at its next
    /// step; the worker thread then ends.
    pub fn shutdown(&self) {
        let mut w = lock(&self.waiting);
        w.shutdown = true;
        if let Some(job) = &w.running {
            job.cancel.store(true, Ordering::Relaxed);
        }
        for job in w.jobs.drain(..) {
            job.answer(Err(JobError::ShuttingDown));
        }
        drop(w);
        self.ready.notify_all();
    }

    /// The running job's progress; asks the worker for a preview at its next step when
    /// `want_image`.
    pub fn status(&self, want_image: bool) -> Status {
        if want_image {
            self.want_preview.store(true, Ordering::Relaxed);
        }
        lock(&self.status).clone()
    }

    fn next_job(&self) -> Option<Arc<Job>> {
        let mut w = lock(&self.waiting);
        loop {
            if let Some(job) = w.jobs.pop_front() {
                w.running = Some(job.clone());
                let mut s = lock(&self.status);
                *s = Status {
                    job: Some(job.id),
                    job_count: w.jobs.len() + 1,
                    started: Some(Instant::now()),
                    job_timestamp: timestamp(),
                    ..Status::default()
                };
                return Some(job);
            }
            if w.shutdown {
                return None;
            }
            w = self.ready.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self) {
        let mut w = lock(&self.waiting);
        w.running = None;
        let mut s = lock(&self.status);
        *s = Status { job_count: w.jobs.len(), ..Status::default() };
    }
}

/// `%Y%m%d%H%M%S` in UTC, as A1111's `job_timestamp`.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The worker: owns the loaded model.
struct Worker {
    queue: Arc<Queue>,
    device: DeviceArgs,
    pipe: Pipeline,
    title: String,
}

/// Starts the worker thread over an already loaded model; `models[0]` is the loaded one.
pub fn start(
    pipe: Pipeline,
    models: Vec<ModelEntry>,
    device: DeviceArgs,
    capacity: usize,
) -> (Arc<Queue>, std::thread::JoinHandle<()>) {
    let title = models.first().map(|m| m.title.clone()).unwrap_or_default();
    let queue = Arc::new(Queue {
        waiting: Mutex::new(Waiting { jobs: VecDeque::new(), running: None, shutdown: false }),
        ready: Condvar::new(),
        capacity,
        next_id: AtomicU64::new(0),
        want_preview: AtomicBool::new(false),
        status: Mutex::new(Status::default()),
        loaded: RwLock::new(LoadedModel::of(&pipe, &title)),
        models,
    });
    let mut worker = Worker { queue: queue.clone(), device, pipe, title };
    let handle = std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            while let Some(job) = worker.queue.next_job() {
                let result = if job.cancel.load(Ordering::Relaxed) {
                    Err(JobError::Interrupted { step: 0, total: 0 })
                } else {
                    // On rayon's pool: see `ltd_nn::on_cpu_pool`.
                    ltd_nn::on_cpu_pool(|| worker.run(&job))
                };
                worker.queue.finish();
                job.answer(result);
            }
        })
        .expect("the OS starts a thread");
    (queue, handle)
}

impl Worker {
    fn run(&mut self, job: &Job) -> Result<Output, JobError> {
        let _span = tracing::info_span!("job", id = job.id).entered();
        match &job.kind {
            JobKind::SwitchModel(title) => {
                self.switch(title)?;
                Ok(Output { images: Vec::new(), model: self.title.clone(), seconds: 0.0 })
            }
            JobKind::Generate { model, requests } => {
                if let Some(title) = model {
                    self.switch(title)?;
                }
                let start = Instant::now();
                let mut images = Vec::new();
                lock(&self.queue.status).batches = requests.len();
                for (k, req) in requests.iter().enumerate() {
                    lock(&self.queue.status).batch = k;
                    images.extend(self.generate(job, req)?);
                }
                let seconds = start.elapsed().as_secs_f64();
                Ok(Output { images, model: self.title.clone(), seconds })
            }
        }
    }

    fn generate(&self, job: &Job, req: &GenerateRequest) -> Result<Vec<GeneratedImage>, JobError> {
        let queue = &self.queue;
        let pipe = &self.pipe;
        let mut on_step = |p: ltd_pipeline::Progress<'_>| {
            {
                let mut s = lock(&queue.status);
                s.step = p.step;
                s.steps = p.total;
            }
            if queue.want_preview.swap(false, Ordering::Relaxed) {
                match pipe.preview(p.latents).map_err(anyhow::Error::from).and_then(|img| {
                    ltd_cli::encode_png(&img, "")
                        .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
                }) {
                    Ok(b64) => lock(&queue.status).current_image = Some(b64),
                    Err(e) => tracing::warn!("preview failed: {e:#}"),
                }
            }
            if job.cancel.load(Ordering::Relaxed) {
                p.cancel();
            }
        };
        match pipe.generate(req, &mut on_step) {
            Ok(g) => Ok(g.images),
            Err(PipelineError::InvalidRequest { field, message }) => {
                Err(JobError::Invalid { field, message })
            }
            Err(PipelineError::Cancelled { step, total }) => {
                Err(JobError::Interrupted { step, total })
            }
            Err(e) => Err(JobError::Failed(e.to_string())),
        }
    }

    /// Loads the model named `title` (the new one first, so a failure keeps the old).
    fn switch(&mut self, title: &str) -> Result<(), JobError> {
        if title == self.title {
            return Ok(());
        }
        let entry = self
            .queue
            .models
            .iter()
            .find(|m| m.title == title)
            .ok_or_else(|| JobError::UnknownModel(title.to_string()))?;
        let start = Instant::now();
        let pipe = entry
            .args
            .load(&self.device)
            .map_err(|e| JobError::Failed(format!("{e:#}")))?
            .with_name(title);
        tracing::info!(model = title, seconds = start.elapsed().as_secs_f64(), "model loaded");
        *self.queue.loaded.write().unwrap_or_else(|e| e.into_inner()) =
            LoadedModel::of(&pipe, title);
        self.pipe = pipe;
        self.title = title.to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = timestamp();
        assert_eq!(t.len(), 14, "{t}");
        assert!(t.starts_with("20"), "{t}");
        let month: u32 = t[4..6].parse().unwrap();
        let day: u32 = t[6..8].parse().unwrap();
        assert!((1..=12).contains(&month) && (1..=31).contains(&day), "{t}");
    }
}
