//! The `switchyard` command: parses the command line and dispatches to [`switchyard::cmd`].

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: the stages allocate many short-lived values across threads,
/// where glibc spent about a third of the process's CPU (profile in the README's benchmark section).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = switchyard::cmd::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(switchyard::cmd::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.trim_end());
            ExitCode::FAILURE
        }
    }
}
