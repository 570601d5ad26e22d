//! `mailreplica generate WHAT`: the man pages and shell completions, printed on stdout, made
//! from the same definitions as `--help` (clap's) and the configuration's own key table
//! ([`mailreplica::config::KEYS`]), so that the installed documentation never drifts.
//!
//! ```text
//!   mailreplica generate man       > mailreplica.1
//!   mailreplica generate toml-man  > mailreplica.toml.5
//!   mailreplica generate bash|zsh|fish
//! ```

use std::io::Write;

use anyhow::Context;
use clap::{CommandFactory, ValueEnum};
use clap_complete::Shell;
use mailreplica::config::KEYS;

use super::{Cli, Failure};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum What {
    /// mailreplica(1).
    Man,
    /// mailreplica.toml(5).
    TomlMan,
    /// bash completion.
    Bash,
    /// zsh completion.
    Zsh,
    /// fish completion.
    Fish,
}

pub(crate) fn generate(what: What) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let mut cmd = visible(Cli::command());
    let shell =
        |s| move |cmd: &mut clap::Command, out: &mut dyn Write| clap_complete::generate(s, cmd, "mailreplica", out);
    match what {
        What::Man => clap_mangen::Man::new(cmd).render(&mut out).context("writing the man page")?,
        What::TomlMan => out.write_all(toml_man().as_bytes()).context("writing the man page")?,
        What::Bash => shell(Shell::Bash)(&mut cmd, &mut out),
        What::Zsh => shell(Shell::Zsh)(&mut cmd, &mut out),
        What::Fish => shell(Shell::Fish)(&mut cmd, &mut out),
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// `cmd` without its hidden sub-commands (clap_complete offers them otherwise).
fn visible(cmd: clap::Command) -> clap::Command {
    let hidden: Vec<String> =
        cmd.get_subcommands().filter(|s| s.is_hide_set()).map(|s| s.get_name().to_owned()).collect();
    let mut out = clap::Command::new("mailreplica");
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out = out.version(super::VERSION);
    for a in cmd.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
        out = out.arg(a.clone());
    }
    for s in cmd.get_subcommands().filter(|s| !hidden.iter().any(|h| h == s.get_name())) {
        out = out.subcommand(s.clone());
    }
    out.subcommand_required(true)
}

/// Text for roff: backslashes escaped, and no line that roff would take as a request.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    escaped
        .lines()
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// mailreplica.toml(5), from the key table and the example configuration.
pub(crate) fn toml_man() -> String {
    let mut m = String::new();
    m.push_str(&format!(
        ".TH MAILREPLICA.TOML 5 \"\" \"mailreplica {}\" \"File Formats\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    m.push_str(".SH NAME\nmailreplica.toml \\- configuration of mailreplica\n");
    m.push_str(".SH SYNOPSIS\n/etc/mailreplica/mailreplica.toml\n");
    m.push_str(&format!(
        ".SH DESCRIPTION\n{}\n",
        roff(
            "mailreplica reads this TOML file (or the one given with -c FILE), and -o KEY=VALUE overrides any \
             key (-o replicator.KEY=VALUE for the [replicator] table). An unknown key, or a value that does not \
             parse, is an error that names the file and the line. On the sending server the file names root's \
             SSH key: keep it root:root 0600."
        )
    ));
    let section = |m: &mut String, title: &str, replicator: bool| {
        m.push_str(&format!(".SH \"{title}\"\n"));
        for k in KEYS.iter().filter(|k| k.key.starts_with("replicator.") == replicator) {
            m.push_str(&format!(
                ".TP\n.B {}\n{}\n.br\nDefault: {}.\n",
                roff(k.key.trim_start_matches("replicator.")),
                roff(k.meaning),
                roff(k.default)
            ));
        }
    };
    section(&mut m, "KEYS", false);
    section(&mut m, "THE [replicator] TABLE", true);
    m.push_str(&format!(".SH EXAMPLE\n.nf\n{}\n.fi\n", roff(include_str!("../../deploy/mailreplica.toml.example"))));
    m.push_str(".SH \"SEE ALSO\"\nmailreplica(1), mailreplica\\-wrapper(8), doveadm\\-sync(1)\n");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_the_man_page_leave_internal_commands_out() {
        let cmd = visible(Cli::command());
        let names: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
        assert!(names.contains(&"sync") && names.contains(&"replicator") && !names.contains(&"relay"), "{names:?}");
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut visible(Cli::command()), "mailreplica", &mut buf);
            let text = String::from_utf8(buf).unwrap();
            assert!(text.contains("replicator") && !text.contains("relay"), "{shell:?}");
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains("replicator") && !page.contains("relay"));
    }

    #[test]
    fn the_toml_page_names_every_key_and_is_plain_roff() {
        let m = toml_man();
        for k in KEYS {
            let short = roff(k.key.trim_start_matches("replicator."));
            assert!(m.contains(&format!(".B {short}\n")), "{short}");
        }
        for line in m.lines() {
            if let Some(req) = line.strip_prefix('.') {
                let name = req.split_whitespace().next().unwrap_or_default();
                assert!(["TH", "SH", "TP", "B", "br", "nf", "fi"].contains(&name), "unexpected request: {line}");
            }
        }
    }
}
