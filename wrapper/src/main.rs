//! `mailreplica-wrapper`: the root-owned SSH forced command (not built yet; see the README).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("mailreplica-wrapper: access denied");
    std::process::ExitCode::from(126)
}
