//! TOML configuration files for the relay binaries.
//!
//! A file holds the same settings as the command line: each key is a long flag name (`-` or
//! `_`), e.g. `pickup_timeout = "10s"`. Values are strings, numbers, booleans, arrays (for
//! repeatable flags) or tables (for `NAME=VALUE` flags such as `agent_token = { robot =
//! "…" }`). [`apply`] makes every file value the *default* of its flag, so clap's own
//! precedence gives flag > environment variable > file > built-in default, and every value
//! is checked by the flag's own parser. Errors name the file, the line and the key.
//! A relative path in the file (any flag whose values are paths) is relative to the file's
//! own directory, so a configuration directory can be moved or referred to from anywhere;
//! on the command line and in environment variables paths stay relative to the working
//! directory, as everywhere else.
//!
//! [`logs`], [`runtime`] and [`allocator`] hold the other pieces both binaries share:
//! `--log` / `--log-format` set-up, the runtime sized by `--worker-threads`, and the
//! memory allocator.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod allocator;
pub mod listen;
pub mod logs;
pub mod manual;
pub mod runtime;
pub mod spin;
pub mod telemetry;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::builder::Resettable;
use clap::{ArgAction, Command, Id};

/// A parsed configuration file.
#[derive(Debug, Clone)]
pub struct FileConfig {
    path: PathBuf,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    line: usize,
    values: Vec<String>,
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Unreadable file.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Not TOML, or a value of a type no flag takes.
    #[error("{path}:{line}: {reason}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// Why.
        reason: String,
    },
    /// A key that is no flag of this program.
    #[error("{path}:{line}: unknown key `{key}`{hint}")]
    UnknownKey {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The key.
        key: String,
        /// A suggestion.
        hint: String,
    },
    /// A value the flag's parser refuses.
    #[error("{path}:{line}: `{key}`: {reason}")]
    Value {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The key.
        key: String,
        /// The parser's message.
        reason: String,
    },
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileConfig, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(path, &text)
}

/// Parses `text` (read from `path`, which error messages name).
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, FileError> {
    let shown = path.display().to_string();
    let table: std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| FileError::Syntax {
            path: shown.clone(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            reason: e.message().to_owned(),
        })?;
    let mut entries = Vec::new();
    for (key, value) in table {
        let line = line_of(text, key.span().start);
        let bad = |reason: String| FileError::Syntax {
            path: shown.clone(),
            line,
            reason,
        };
        let values =
            match value.get_ref() {
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        scalar(v).ok_or_else(|| {
                            bad(format!(
                                "`{}`: arrays hold strings, numbers or booleans",
                                key.get_ref()
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
                toml::Value::Table(t) => t
                    .iter()
                    .map(|(k, v)| {
                        scalar(v).map(|v| format!("{k}={v}")).ok_or_else(|| {
                            bad(format!(
                                "`{}.{k}`: table values are strings or numbers",
                                key.get_ref()
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
                v => vec![scalar(v)
                    .ok_or_else(|| bad(format!("`{}`: unsupported value", key.get_ref())))?],
            };
        entries.push(Entry {
            key: key.into_inner(),
            line,
            values,
        });
    }
    Ok(FileConfig {
        path: path.to_owned(),
        entries,
    })
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn normal(key: &str) -> String {
    key.replace('-', "_")
}

/// Makes every value of `file` the default of its flag in `cmd` (see the crate docs), after
/// checking it with the flag's own parser. `reserved` keys (such as `config` itself) are
/// refused.
pub fn apply(mut cmd: Command, file: &FileConfig, reserved: &[&str]) -> Result<Command, FileError> {
    let shown = file.path.display().to_string();
    for entry in &file.entries {
        let key = normal(&entry.key);
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long().is_some_and(|l| normal(l) == key))
            .filter(|_| !reserved.contains(&key.as_str()))
            .cloned();
        let Some(arg) = arg else {
            let hint = cmd
                .get_arguments()
                .filter_map(|a| a.get_long())
                .map(normal)
                .find(|l| l.starts_with(&key[..key.len().min(5)]))
                .map(|l| format!(" (did you mean `{l}`?)"))
                .unwrap_or_default();
            return Err(FileError::UnknownKey {
                path: shown,
                line: entry.line,
                key: entry.key.clone(),
                hint,
            });
        };
        let long = arg
            .get_long()
            .expect("bug: found by its long name")
            .to_owned();
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        // Check the values with the flag's parser, on a command of this one flag.
        let mut argv: Vec<OsString> = vec!["check".into()];
        if is_switch {
            match entry.values.as_slice() {
                [v] if v == "true" => argv.push(format!("--{long}").into()),
                [v] if v == "false" => {}
                _ => {
                    return Err(FileError::Value {
                        path: shown,
                        line: entry.line,
                        key: entry.key.clone(),
                        reason: "expected true or false".into(),
                    })
                }
            }
        } else {
            for v in &entry.values {
                argv.push(format!("--{long}").into());
                argv.push(v.into());
            }
        }
        // Alone in its command, the flag must not refer to others.
        let alone = arg
            .clone()
            .required(false)
            .env(None::<&str>)
            .conflicts_with(Resettable::<Id>::Reset)
            .requires(Resettable::<Id>::Reset)
            .overrides_with(Resettable::<Id>::Reset)
            .required_unless_present(Resettable::<Id>::Reset);
        let probe = Command::new("check").arg(alone);
        if let Err(e) = probe.try_get_matches_from(argv) {
            let reason = e
                .to_string()
                .lines()
                .next()
                .unwrap_or("invalid value")
                .trim_start_matches("error: ")
                .to_owned();
            return Err(FileError::Value {
                path: shown,
                line: entry.line,
                key: entry.key.clone(),
                reason,
            });
        }
        let mut values = entry.values.clone();
        if arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>() {
            let dir = file.path.parent().unwrap_or(Path::new(""));
            for v in &mut values {
                if Path::new(v.as_str()).is_relative() {
                    *v = dir.join(&*v).to_string_lossy().into_owned();
                }
            }
        }
        cmd = cmd.mut_arg(arg.get_id().clone(), move |a| {
            // A value from the file satisfies a required flag.
            let a = a.required(false);
            if is_switch {
                a.default_value(if values[0] == "true" { "true" } else { "false" })
            } else {
                a.default_values(values)
            }
        });
    }
    Ok(cmd)
}

/// The `--config FILE` (or `--config=FILE`) on the command line, else `env_var`.
pub fn config_path(args: &[OsString], env_var: &str) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(env_var).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("t")
            .arg(
                Arg::new("timeout")
                    .long("pickup-timeout")
                    .default_value("10")
                    .value_parser(clap::value_parser!(u32)),
            )
            .arg(
                Arg::new("token")
                    .long("agent-token")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("open")
                    .long("allow-open")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("name").long("name").env("T_NAME_X"))
    }

    fn file(text: &str) -> Result<FileConfig, FileError> {
        parse(Path::new("relay.toml"), text)
    }

    #[test]
    fn precedence_flag_over_file_over_default() {
        let f = file("pickup_timeout = 30\nagent-token = { robot = \"abc\", b = \"d\" }\nallow_open = true\nname = \"f\"\n").unwrap();
        let m = apply(cmd(), &f, &[]).unwrap().get_matches_from(["t"]);
        assert_eq!(m.get_one::<u32>("timeout"), Some(&30));
        let tokens: Vec<_> = m.get_many::<String>("token").unwrap().collect();
        assert_eq!(tokens, ["b=d", "robot=abc"]);
        assert!(m.get_flag("open"));
        assert_eq!(m.get_one::<String>("name").unwrap(), "f");
        let m = apply(cmd(), &f, &[])
            .unwrap()
            .get_matches_from(["t", "--pickup-timeout", "5"]);
        assert_eq!(m.get_one::<u32>("timeout"), Some(&5));
        let m = apply(cmd(), &file("").unwrap(), &[])
            .unwrap()
            .get_matches_from(["t"]);
        assert_eq!(m.get_one::<u32>("timeout"), Some(&10));
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let e = apply(
            cmd(),
            &file("\n\npickup_timeout = \"soon\"\n").unwrap(),
            &[],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("relay.toml:3: `pickup_timeout`:"), "{msg}");
        let e = apply(cmd(), &file("# c\npickup_timeut = 3\n").unwrap(), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "relay.toml:2: unknown key `pickup_timeut` (did you mean `pickup_timeout`?)"
        );
        let e = file("a = 1\nb = [\n").unwrap_err();
        assert!(e.to_string().starts_with("relay.toml:"), "{e}");
        let e = apply(cmd(), &file("allow_open = \"yes\"\n").unwrap(), &[]).unwrap_err();
        assert!(e.to_string().contains("expected true or false"), "{e}");
        let e = apply(cmd(), &file("config = \"x\"\n").unwrap(), &["config"]).unwrap_err();
        assert!(e.to_string().contains("unknown key `config`"), "{e}");
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_its_directory() {
        let cmd = || {
            cmd().arg(
                Arg::new("cert")
                    .long("tls-cert")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
        };
        let text = "tls_cert = \"certs/a.pem\"\nname = \"x/y\"\n";
        let f = parse(Path::new("/etc/relay/relay.toml"), text).unwrap();
        let m = apply(cmd(), &f, &[]).unwrap().get_matches_from(["t"]);
        assert_eq!(
            m.get_one::<PathBuf>("cert").unwrap(),
            Path::new("/etc/relay/certs/a.pem")
        );
        // Not a path flag: the value is kept as written.
        assert_eq!(m.get_one::<String>("name").unwrap(), "x/y");
        // Absolute paths, and paths given on the command line, are kept as they are.
        let f = parse(
            Path::new("/etc/relay/relay.toml"),
            "tls_cert = \"/k/a.pem\"\n",
        )
        .unwrap();
        let m = apply(cmd(), &f, &[]).unwrap().get_matches_from(["t"]);
        assert_eq!(m.get_one::<PathBuf>("cert").unwrap(), Path::new("/k/a.pem"));
        let f = parse(Path::new("/etc/relay/relay.toml"), text).unwrap();
        let m = apply(cmd(), &f, &[])
            .unwrap()
            .get_matches_from(["t", "--tls-cert", "b.pem"]);
        assert_eq!(m.get_one::<PathBuf>("cert").unwrap(), Path::new("b.pem"));
        // A file named without a directory: its paths are relative to the working directory.
        let f = parse(Path::new("relay.toml"), text).unwrap();
        let m = apply(cmd(), &f, &[]).unwrap().get_matches_from(["t"]);
        assert_eq!(
            m.get_one::<PathBuf>("cert").unwrap(),
            Path::new("certs/a.pem")
        );
    }

    #[test]
    fn finds_the_config_flag() {
        let args: Vec<OsString> = ["t", "--x", "--config", "a.toml"].map(Into::into).to_vec();
        assert_eq!(config_path(&args, "NOPE_X"), Some(PathBuf::from("a.toml")));
        let args: Vec<OsString> = ["t", "--config=b.toml"].map(Into::into).to_vec();
        assert_eq!(config_path(&args, "NOPE_X"), Some(PathBuf::from("b.toml")));
    }
}
