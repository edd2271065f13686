//! `switchyard config show`: the effective config as YAML — defaults filled in, overrides applied,
//! secrets redacted (tokens, passwords in URLs, secret-looking client settings).

use serde_yaml::Value;

use super::ctx::Ctx;
pub use crate::secret::redact_url;
use crate::secret::{is_secret_name, REDACTED};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the effective config (where it came from on the first line, as a comment).
    Show,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    match args.command {
        ConfigCommand::Show => {
            let l = ctx.load()?;
            let mut v = serde_yaml::to_value(&l.config).map_err(|e| e.to_string())?;
            redact(&mut v, None);
            let text = serde_yaml::to_string(&v).map_err(|e| e.to_string())?;
            println!("# effective config from {}", l.source);
            print!("{text}");
            Ok(())
        }
    }
}

/// Replaces values that are secrets: under secret-looking keys, and passwords inside URLs.
pub fn redact(v: &mut Value, key: Option<&str>) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                redact(val, k.as_str());
            }
        }
        Value::Sequence(s) => {
            for x in s {
                redact(x, None);
            }
        }
        Value::String(s) => {
            if key.is_some_and(is_secret_name) && s != REDACTED {
                *s = REDACTED.to_string();
            } else if let Some(clean) = redact_url(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            redact_url("redis://:hunter2@host:6379/0").as_deref(),
            Some("redis://:<redacted>@host:6379/0")
        );
        assert_eq!(redact_url("redis://host:6379/0"), None);
        assert_eq!(
            redact_url("redis://:pw@a:6379,redis://:pw@b:6379").as_deref(),
            Some("redis://:<redacted>@a:6379,redis://:<redacted>@b:6379")
        );
        let mut v: Value = serde_yaml::from_str(
            "kafka: {producer: {sasl.password: p, linger.ms: '5'}}\nurl: 'rediss://u:p@h'",
        )
        .unwrap();
        redact(&mut v, None);
        let text = serde_yaml::to_string(&v).unwrap();
        assert!(!text.contains(": p\n") && !text.contains("u:p@"), "{text}");
        assert!(text.contains("linger.ms"));
    }
}
