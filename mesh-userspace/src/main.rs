//! `mesh`: see `cli` for the commands.
fn main() -> std::process::ExitCode {
    mesh::cli::main()
}
