//! What every command gets: where the config comes from and the overrides of the command line.

use std::path::{Path, PathBuf};

use crate::config::{
    Config, Loaded, Overrides, Problem, Problems, Source, ENV_BROKERS, ENV_REDIS_URL,
};

/// The config file used when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "switchyard.yaml";

/// What every command gets: where the config comes from and the overrides of the command line.
pub struct Ctx {
    pub config: Option<PathBuf>,
    pub brokers: Option<String>,
    pub redis: Option<String>,
}

impl Overrides for Ctx {
    fn get(&self, var: &str) -> Option<String> {
        let flag = match var {
            ENV_BROKERS => self.brokers.clone(),
            ENV_REDIS_URL => self.redis.clone(),
            _ => None,
        };
        flag.or_else(|| std::env::var(var).ok())
    }
}

impl Ctx {
    /// Loads and checks the config (file, or the embedded default), with every override.
    pub fn load(&self) -> Result<Loaded, String> {
        let loaded = match &self.config {
            Some(p) => Config::load_with(p, self),
            None if Path::new(DEFAULT_FILE).exists() => {
                Config::load_with(Path::new(DEFAULT_FILE), self)
            }
            None => Config::load_embedded(self),
        }
        .map_err(|p| p.to_string())?;
        let problems: Vec<Problem> = crate::stages::problems(&loaded.config)
            .into_iter()
            .map(|(item, message)| Problem { item, message })
            .collect();
        if !problems.is_empty() {
            return Err(Problems {
                file: loaded.source.to_string(),
                problems,
            }
            .to_string());
        }
        Ok(loaded)
    }

    /// [`Ctx::load`], saying on stderr when the embedded default is used (for commands whose
    /// output is not a log).
    pub fn load_noting(&self) -> Result<Loaded, String> {
        let l = self.load()?;
        if l.source == Source::Embedded {
            eprintln!(
                "note: no {DEFAULT_FILE} here and no --config: using the embedded default config"
            );
        }
        Ok(l)
    }
}
