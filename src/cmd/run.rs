//! `switchyard run`: the pipeline stages until SIGTERM/SIGINT.

use tokio_util::sync::CancellationToken;

use super::ctx::Ctx;
use crate::config::Source;
use crate::stages;
use crate::telemetry::init_logging;

#[derive(clap::Args)]
pub struct Args {
    /// Stages to run, comma separated (default: those enabled in the config; see `switchyard
    /// config show`).
    #[arg(long, value_delimiter = ',')]
    pub stages: Option<Vec<String>>,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load()?;
    init_logging(l.config.log.format, &l.config.log.level);
    if l.source == Source::Embedded {
        tracing::info!(
            "No switchyard.yaml here and no --config: running the embedded default config."
        );
    }
    let stages = args.stages.unwrap_or_else(|| {
        stages::enabled(&l.config)
            .into_iter()
            .map(String::from)
            .collect()
    });
    for s in &stages {
        if stages::find(s).is_none() {
            return Err(format!(
                "unknown stage {s:?}; this build has {}",
                stages::names()
            ));
        }
    }
    if stages.is_empty() {
        return Err("no stage to run: enable one in the config or pass --stages".into());
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    tracing::info!(?stages, config = %l.source, "Switchyard starting.");
    crate::app::run(l, stages, shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot install SIGTERM handler.");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutdown requested; draining.");
    shutdown.cancel();
}
