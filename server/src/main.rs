//! The `kvfeed` binary: parse, set up logging, dispatch. Everything else
//! lives in the library so that it can be tested without a process.

use std::process::ExitCode;

use clap::Parser;
use kvfeed::cli::{Cli, Command};

/// mimalloc rather than the system allocator: see `server/Cargo.toml`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = kvfeed::logging::init(&cli.log_level) {
        eprintln!("kvfeed: {err}");
        return ExitCode::FAILURE;
    }
    let result: Result<(), Box<dyn std::error::Error>> = match &cli.command {
        Command::Serve(args) => kvfeed::serve::run(args).map_err(Into::into),
        Command::Put(args) => kvfeed::cmd::kv::put(args).map_err(Into::into),
        Command::Get(args) => kvfeed::cmd::kv::get(args).map_err(Into::into),
        Command::Delete(args) => kvfeed::cmd::kv::delete(args).map_err(Into::into),
        Command::Scan(args) => kvfeed::cmd::kv::scan(args).map_err(Into::into),
        Command::Watch(args) => kvfeed::cmd::watch::run(args).map_err(Into::into),
        Command::Bench(args) => kvfeed_bench::run(args).map_err(Into::into),
        Command::Admin(args) => kvfeed::cmd::admin::run(args).map_err(Into::into),
        Command::Changefeed(args) => kvfeed::cmd::changefeed::run(args).map_err(Into::into),
        Command::Verify(args) => kvfeed::cmd::verify::run(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kvfeed: {}", kvfeed::cli::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}
