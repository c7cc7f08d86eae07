//! Shell completions and man pages, generated from the same clap definitions as `--help`, so
//! neither can drift from the flags: `relay-server completions bash|zsh|fish|…` and
//! `relay-server man` (the Debian packages install both; `scripts/package.sh` makes them).

use std::io::Write;

pub use clap_complete::Shell;

/// Writes `cmd`'s completion script for `shell` to stdout.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes `cmd`'s man page (roff, section 1) to stdout, with one section per subcommand.
pub fn man(cmd: clap::Command) -> std::io::Result<()> {
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(out, ".SH \"{}\"", sub.get_name().to_uppercase())?;
        if let Some(about) = sub.get_about() {
            writeln!(out, "{about}")?;
        }
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut out)?;
    }
    man.render_version_section(&mut out)?;
    std::io::stdout().write_all(&out)
}
