//! The `mailreplica` binary: the command line (doveadm's spelling, output formats and exit
//! codes) over the `mailreplica` library. Everything about the command line lives here, in
//! `cli/`, and nowhere in the library.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
