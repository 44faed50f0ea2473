//! How a watcher is told what to do: `WatchOptions` (interval, CPU budget,
//! heal, ...) with their valid ranges, and the TOML config file that names
//! options and critical variables:
//!
//! ```toml
//! interval = "100ms"          # between the starts of two full passes
//! cpu_budget = 20             # percent of one core
//! heal = true
//! pin_cpu = 1
//! on_alert = "logger -t shadowpatch"
//!
//! [[variable]]
//! symbol = "busy!scale"       # (or name = ...) MODULE!SYMBOL or SYMBOL; size from the symbol table
//! mode = "guarded"            # or "mirrored"
//!
//! [[variable]]
//! address = "0x7f0000001000"
//! size = 64
//! mode = "guarded"
//! ```

use shadowpatch_mirror::variables::{parse_number, parse_size};
use shadowpatch_mirror::{VariableError, VariableMode, VariableRequest};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest interval between passes.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Smallest CPU budget, in percent of one core.
pub const MIN_BUDGET: f64 = 0.1;

/// Bad options or config: each names the option or file and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// How a watcher runs.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchOptions {
    /// Time between the starts of two full passes (0: back to back).
    pub interval: Duration,
    /// CPU the watcher thread may use, in percent of one core.
    pub cpu_budget_percent: f64,
    /// Write mirrored bytes back over tampered immutable bytes.
    pub heal: bool,
    /// Bytes verified between two pacing decisions (bounds latency).
    pub slice_bytes: usize,
    /// How long an authorised change may keep differences unreported
    /// before they are reported anyway (e.g. a crashed apply left the
    /// journal ahead of the published generation).
    pub settle_timeout: Duration,
    /// Bytes a just-committed transaction announced stay explained this long.
    pub grace: Duration,
    /// Stops a heal may try while a thread sits in the bytes to rewrite.
    pub heal_attempts: u32,
    /// Record events in the state directory's history.
    pub record_history: bool,
    /// Snapshots kept per mirrored variable (1 to `MAX_KEEP`).
    pub history_keep: usize,
    /// Dirty-page tracking method for mirrored variables (None: the best available).
    pub dirty_method: Option<shadowpatch_mirror::DirtyMethod>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            interval: Duration::from_millis(100),
            cpu_budget_percent: 20.0,
            heal: false,
            slice_bytes: 1 << 20,
            settle_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            heal_attempts: shadowpatch_patch::activate::DEFAULT_ATTEMPTS,
            record_history: true,
            history_keep: shadowpatch_mirror::snapshots::DEFAULT_KEEP,
            dirty_method: None,
        }
    }
}

impl WatchOptions {
    /// Check every option is in its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval > MAX_INTERVAL {
            return Err(invalid(
                "--interval",
                format!("{:?} is out of range (0 to {}s)", self.interval, MAX_INTERVAL.as_secs()),
            ));
        }
        if !(MIN_BUDGET..=100.0).contains(&self.cpu_budget_percent) || self.cpu_budget_percent.is_nan() {
            return Err(invalid(
                "--cpu-budget",
                format!(
                    "{} is out of range ({MIN_BUDGET} to 100 percent of one core)",
                    self.cpu_budget_percent
                ),
            ));
        }
        if !(1..=shadowpatch_mirror::snapshots::MAX_KEEP).contains(&self.history_keep) {
            return Err(invalid(
                "--history",
                format!(
                    "{} is out of range (1 to {} snapshots per variable)",
                    self.history_keep,
                    shadowpatch_mirror::snapshots::MAX_KEEP
                ),
            ));
        }
        if self.slice_bytes < 4096 {
            return Err(invalid("slice_bytes", "must be at least one page (4096)".into()));
        }
        Ok(())
    }
}

fn invalid(origin: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_string(),
        message,
    }
}

/// `100ms`, `2s`, `1.5s`, `500us`, `1m`, or a plain number of milliseconds.
pub fn parse_duration(text: &str, origin: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| invalid(origin, format!("{text:?} is not a duration (e.g. 100ms, 2s)")))?;
    let seconds = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "us" | "µs" => value / 1_000_000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        other => {
            return Err(invalid(
                origin,
                format!("unknown unit {other:?} in {text:?} (use us, ms, s or m)"),
            ))
        }
    };
    if !seconds.is_finite() || seconds > MAX_INTERVAL.as_secs_f64() {
        return Err(invalid(
            origin,
            format!("{text} is out of range (0 to {}s)", MAX_INTERVAL.as_secs()),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A parsed config file: options it sets (None: not set) and variables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchConfig {
    pub interval: Option<Duration>,
    pub cpu_budget_percent: Option<f64>,
    pub heal: Option<bool>,
    pub pin_cpu: Option<usize>,
    pub on_alert: Option<String>,
    pub variables: Vec<VariableRequest>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interval: Option<toml::Value>,
    cpu_budget: Option<f64>,
    heal: Option<bool>,
    pin_cpu: Option<usize>,
    on_alert: Option<String>,
    #[serde(default, rename = "variable")]
    variables: Vec<RawVariable>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariable {
    #[serde(alias = "name")]
    symbol: Option<String>,
    module: Option<String>,
    address: Option<toml::Value>,
    size: Option<toml::Value>,
    mode: VariableMode,
}

impl WatchConfig {
    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<WatchConfig, ConfigError> {
        let file_error = |message: String| ConfigError::File {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        Self::parse(path, &text)
    }

    /// Check the text of a config file read from `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<WatchConfig, ConfigError> {
        let file_error = |message: String| ConfigError::File {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| format!("line {}: ", text[..span.start].matches('\n').count() + 1))
                .unwrap_or_default();
            file_error(format!("{line}{}", e.message().replace('\n', " ")))
        })?;
        let origin = |what: String| format!("{}: {what}", path.display());
        let mut config = WatchConfig {
            interval: raw
                .interval
                .map(|value| match value {
                    toml::Value::String(text) => parse_duration(&text, &origin("interval".into())),
                    toml::Value::Integer(ms) if ms >= 0 => parse_duration(&ms.to_string(), &origin("interval".into())),
                    other => Err(invalid(
                        &origin("interval".into()),
                        format!("{other} is not a duration (e.g. \"100ms\")"),
                    )),
                })
                .transpose()?,
            cpu_budget_percent: raw.cpu_budget,
            heal: raw.heal,
            pin_cpu: raw.pin_cpu,
            on_alert: raw.on_alert,
            variables: Vec::new(),
        };
        for (index, variable) in raw.variables.into_iter().enumerate() {
            let origin = origin(format!("variable {}", index + 1));
            config
                .variables
                .push(raw_variable(variable, &origin).map_err(|e| invalid(&origin, strip(&e, &origin)))?);
        }
        Ok(config)
    }
}

/// A variable error's message without its origin prefix (re-added by the caller).
fn strip(error: &VariableError, origin: &str) -> String {
    let text = error.to_string();
    text.strip_prefix(&format!("{origin}: ")).unwrap_or(&text).to_string()
}

fn raw_variable(variable: RawVariable, origin: &str) -> Result<VariableRequest, VariableError> {
    let syntax = |message: &str| VariableError::Syntax {
        origin: origin.to_string(),
        message: message.to_string(),
    };
    let number = |value: &toml::Value, what: &str, size: bool| -> Result<u64, VariableError> {
        match value {
            toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            toml::Value::String(text) => if size { parse_size(text) } else { parse_number(text) }
                .ok_or_else(|| syntax(&format!("{what} {text:?} is not a number"))),
            other => Err(syntax(&format!("{what} {other} is not a number"))),
        }
    };
    match (variable.symbol, variable.address) {
        (Some(symbol), None) => {
            if variable.size.is_some() {
                return Err(syntax(
                    "a symbol's size comes from the symbol table; give address and size instead",
                ));
            }
            let text = match variable.module {
                Some(module) => format!("{module}!{symbol}"),
                None => symbol,
            };
            VariableRequest::parse(&text, variable.mode, origin)
        }
        (None, Some(address)) => {
            let address = number(&address, "address", false)?;
            let size = variable
                .size
                .as_ref()
                .ok_or_else(|| syntax("an address needs a size"))
                .and_then(|size| number(size, "size", true))?;
            VariableRequest::parse(&format!("{address:#x}:{size}"), variable.mode, origin)
        }
        (Some(_), Some(_)) => Err(syntax("give either symbol or address, not both")),
        (None, None) => Err(syntax("needs a symbol or an address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowpatch_mirror::variables::VariableTarget;

    #[test]
    fn durations_parse_with_units_and_out_of_range_is_refused() {
        assert_eq!(parse_duration("100ms", "x").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2s", "x").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250", "x").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("500us", "x").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("0", "x").unwrap(), Duration::ZERO);
        for bad in ["", "fast", "-1s", "2h", "10 parsecs", "7200s"] {
            let error = parse_duration(bad, "--interval").unwrap_err().to_string();
            assert!(error.starts_with("--interval: "), "{bad:?}: {error}");
        }
    }

    #[test]
    fn options_out_of_range_name_the_option() {
        let mut options = WatchOptions::default();
        options.validate().unwrap();
        options.cpu_budget_percent = 0.0;
        assert!(options
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--cpu-budget: "));
        options.cpu_budget_percent = 150.0;
        assert!(options.validate().is_err());
        options.cpu_budget_percent = 20.0;
        options.interval = Duration::from_secs(7200);
        assert!(options.validate().unwrap_err().to_string().starts_with("--interval: "));
    }

    #[test]
    fn config_file_sets_options_and_variables_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watch.toml");
        std::fs::write(
            &path,
            "interval = \"50ms\"\ncpu_budget = 10\nheal = true\n\
             [[variable]]\nsymbol = \"scale\"\nmodule = \"busy\"\nmode = \"guarded\"\n\
             [[variable]]\naddress = \"0x1000\"\nsize = \"4K\"\nmode = \"mirrored\"\n",
        )
        .unwrap();
        let config = WatchConfig::load(&path).unwrap();
        assert_eq!(config.interval, Some(Duration::from_millis(50)));
        assert_eq!(config.cpu_budget_percent, Some(10.0));
        assert_eq!(config.heal, Some(true));
        assert_eq!(
            config.variables[0].target,
            VariableTarget::Symbol {
                module: Some("busy".into()),
                name: "scale".into()
            }
        );
        assert_eq!(config.variables[1].mode, VariableMode::Mirrored);
        assert_eq!(
            config.variables[1].target,
            VariableTarget::Range {
                address: 0x1000,
                size: 4096
            }
        );

        std::fs::write(&path, "interval = \"50ms\"\nspeed = 3\n").unwrap();
        let error = WatchConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("speed"), "{error}");
        assert!(!error.contains('\n'));
        std::fs::write(&path, "[[variable]]\naddress = 4096\nmode = \"guarded\"\n").unwrap();
        let error = WatchConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("variable 1") && error.contains("needs a size"),
            "{error}"
        );
    }
}
