//! `ltd-serve`: an HTTP server that keeps a model loaded and generates images for clients of
//! AUTOMATIC1111's web API (`/sdapi/v1/…`) and OpenAI's images API, with a web page at `/`.
//!
//! One generation at a time (per process, so per device); the others wait in a bounded FIFO
//! queue. Nothing but the loaded model is kept between requests, so several instances (one
//! per GPU) behind any HTTP load balancer scale out. SIGTERM or Ctrl-C stops the running job
//! at its next step, answers every request and exits.

mod a1111;
mod error;
mod openai;
mod queue;
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ltd_cli::{default_model, DeviceArgs, ModelArgs};

use crate::queue::ModelEntry;

/// Serve Stable Diffusion over HTTP: AUTOMATIC1111's API (/sdapi/v1/txt2img, img2img,
/// progress, interrupt, …), OpenAI's /v1/images/generations, and a web page at /.
///
/// Examples:
///
///   ltd-serve                                  (the embedded default model, on 127.0.0.1:7860)
///
///   ltd-serve -m ./sd15 --device cuda --listen 0.0.0.0:7860 --api-key "$KEY"
#[derive(Debug, Parser)]
#[command(name = "ltd-serve", version, verbatim_doc_comment, max_term_width = 100)]
struct Args {
    /// `--model`, `--variant` (as ltd-gen's).
    #[command(flatten)]
    model: ModelArgs,

    /// `--device`, `--dtype` (as ltd-gen's).
    #[command(flatten)]
    device: DeviceArgs,

    /// Address and port to listen on. The default answers this machine only; 0.0.0.0:PORT
    /// answers the network (set --api-key then). Port 0 picks a free port (logged).
    #[arg(long, default_value = "127.0.0.1:7860", value_name = "ADDR:PORT")]
    listen: SocketAddr,

    /// Require this key: `Authorization: Bearer KEY`, or HTTP basic auth with KEY as the
    /// password (or USER:PASSWORD as KEY, like A1111's --api-auth). Also read from
    /// LTD_API_KEY, which keeps it out of the process list.
    #[arg(long, env = "LTD_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,

    /// Requests that may wait while one runs; more get 503 with Retry-After.
    #[arg(long, default_value_t = 8, value_name = "N")]
    queue: usize,

    /// Largest request body in MiB (init images arrive base64 in JSON); larger get 413.
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    max_body_mib: usize,
}

/// Large blocks on transparent huge pages (see `ltd_nn::alloc`): a quarter of a CPU U-Net step
/// was page faults without.
#[global_allocator]
static ALLOC: ltd_nn::alloc::HugePageAlloc = ltd_nn::alloc::HugePageAlloc;

fn main() -> ExitCode {
    ltd_nn::pin_cpu_threads();
    let args = Args::parse();
    init_tracing();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: this server's requests at info, the
/// libraries' warnings).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ltd_serve=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The models clients may pick: the one loaded, and the embedded default model besides a
/// `--model`.
fn model_entries(args: &ModelArgs) -> Result<Vec<ModelEntry>> {
    let (_, title) = args.source()?;
    let mut list = vec![ModelEntry { title, args: args.clone() }];
    if let (Some(_), Some(name)) = (&args.model, default_model::name()) {
        if list[0].title != name {
            list.push(ModelEntry { title: name.to_string(), args: ModelArgs::default() });
        }
    }
    Ok(list)
}

fn run(args: Args) -> Result<()> {
    let models = model_entries(&args.model)?;
    let start = std::time::Instant::now();
    let pipe = args.model.load(&args.device)?;
    tracing::info!(
        model = %models[0].title,
        seconds = start.elapsed().as_secs_f64(),
        "model loaded"
    );
    let (queue, worker) = queue::start(pipe, models, args.device.clone(), args.queue);
    let state = server::AppState {
        queue: queue.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        body_limit: args.max_body_mib.saturating_mul(1 << 20),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!("listening on http://{addr}");
        if !addr.ip().is_loopback() && state.api_key.is_none() {
            tracing::warn!("listening beyond this machine without --api-key");
        }
        let app = server::router(state);
        let q = queue.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop_signal().await;
                tracing::info!("shutting down: the running job stops at its next step");
                q.shutdown();
            })
            .await
            .context("serving")
    })?;
    queue.shutdown();
    let _ = worker.join();
    tracing::info!("stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_well_formed_and_documents_every_flag() {
        use clap::CommandFactory;
        let cmd = Args::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.len() > 10, "--{} has no real help text", arg.get_id());
        }
    }
}
