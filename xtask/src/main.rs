//! `cargo xtask`: every step a fresh machine needs, done idempotently with a line of progress
//! each. Runs on the machine's default Rust; the project itself builds with the pinned
//! toolchains that `bootstrap` installs.
mod bench;
mod bootstrap;
mod demo;
mod image;
mod kernels;
mod kind;
mod manifests;
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
        /// The shipped build: profile `dist` (release with LTO), into target/dist.
        #[arg(long)]
        release: bool,
    },
    /// Unit tests, then the privileged integration tests (needs root), then a leak check.
    Test {
        /// Instead, run the integration tests on these kernels under QEMU: `5.10,6.1,6.12` or
        /// `all` (the series pinned in xtask/kernels/pins.txt).
        #[arg(long, value_name = "SERIES")]
        kernels: Option<String>,
    },
    /// Balance real connections over three backends, change the endpoints, watch it follow.
    Demo,
    /// The agent's OCI image (static binary, empty base), without a container engine, into
    /// target/image/mesh.oci.tar: for `podman load`, `docker load`, `kind load image-archive`.
    Image,
    /// Validate deploy/ (rendered by `kubectl kustomize`) and deploy/examples against the
    /// Kubernetes 1.33 and 1.37 schemas and the Gateway API CRDs (also part of `test`).
    Manifests,
    /// End to end in a kind cluster (needs Docker and kind): the image loaded, deploy/ and the
    /// example applied, balancing, the HTTPRoute split, metrics and a rolling restart checked
    /// from a client pod, then the cluster deleted.
    Kind {
        /// Leave the cluster running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// `cargo fmt --check` and `cargo clippy --all-targets -- -D warnings`, with the pinned
    /// toolchain.
    Lint,
    /// Benchmarks: `l4`, `l7` and `mtls` (two nodes, against Envoy) as ratios against a baseline
    /// in the same run, `control-plane` at 10k Services / 100k endpoints, `authz` (a decision
    /// with 1,000 AuthorizationPolicies against none).
    Bench {
        #[arg(default_value = "l4")]
        suite: String,
        /// Only this l4 case (repeatable), e.g. `--case connect+close`; for l7, `--case mesh`
        /// runs mesh's rows alone (no Envoy, no nginx proxy).
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
        /// l7: record the mesh agent with `perf record -g` during its HTTP/1.1 load into FILE (and
        /// with access log and traces on, into FILE with the extension `observed`). Not under the
        /// temp dir: the agent watches its config directory's parent there.
        #[arg(long, value_name = "FILE")]
        perf: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build { release } => {
            bootstrap::ensure()?;
            bootstrap::build(release)?;
        }
        Command::Test { kernels } => {
            bootstrap::ensure()?;
            match kernels {
                Some(selection) => kernels::run(&selection)?,
                None => test::run()?,
            }
        }
        Command::Image => {
            bootstrap::ensure()?;
            image::run()?;
        }
        Command::Manifests => manifests::run()?,
        Command::Kind { keep } => {
            bootstrap::ensure()?;
            kind::run(keep)?;
        }
        Command::Lint => {
            bootstrap::ensure()?;
            lint()?;
        }
        Command::Demo => {
            bootstrap::ensure()?;
            bootstrap::build(false)?;
            demo::run()?;
        }
        Command::Bench { suite, cases, perf } => {
            bootstrap::ensure()?;
            bootstrap::build(true)?;
            bench::run(&suite, &cases, perf.as_deref())?;
        }
    }
    Ok(())
}

/// Formatting and lints, as CI checks them.
fn lint() -> anyhow::Result<()> {
    for args in [&["fmt", "--all", "--check"][..], &["clippy", "--all-targets", "--", "-D", "warnings"][..]] {
        println!("[lint] cargo {}", args.join(" "));
        let status = bootstrap::cargo().args(args).status()?;
        anyhow::ensure!(status.success(), "cargo {} failed", args.join(" "));
    }
    println!("[lint] clean");
    Ok(())
}
