//! `cargo xtask`: every step a fresh machine needs, done idempotently with a line of progress
//! each. Runs on the machine's default Rust; the project itself builds with the pinned
//! toolchains that `bootstrap` installs.
mod bootstrap;
mod demo;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing, then build the agent (with its kernel programs) and tools.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Unit tests, then the privileged integration tests (needs root), then a leak check.
    Test,
    /// Balance real connections over three backends, change the endpoints, watch it follow.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build { release } => {
            bootstrap::ensure()?;
            bootstrap::build(release)?;
        }
        Command::Test => {
            bootstrap::ensure()?;
            test::run()?;
        }
        Command::Demo => {
            bootstrap::ensure()?;
            bootstrap::build(false)?;
            demo::run()?;
        }
    }
    Ok(())
}
