//! Avro schemas from `schemas/`, looked up by name (to write) and by fingerprint (to read).
//!
//! Records use Avro single-object encoding: `C3 01`, the 8-byte CRC-64-AVRO (Rabin) fingerprint of the
//! writer's schema, then the binary datum. A reader needs only the schema files to decode them.

use std::collections::HashMap;
use std::path::Path;

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::Schema;

/// The two marker bytes that start every single-object encoded record.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Marker plus fingerprint.
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("schema file {path} is not a valid Avro schema: {message}")]
    Parse { path: String, message: String },
    #[error("schema files {first} and {second} both define {name}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
}

/// One loaded schema with its single-object header precomputed.
#[derive(Debug, Clone)]
pub struct RegisteredSchema {
    /// File stem, e.g. `deployment` for `schemas/deployment.avsc`; topics refer to schemas by it.
    pub name: String,
    pub schema: Schema,
    pub header: [u8; SINGLE_OBJECT_HEADER_LEN],
}

/// All schemas known to this process.
#[derive(Debug, Clone, Default)]
pub struct SchemaRegistry {
    by_name: HashMap<String, RegisteredSchema>,
    by_fingerprint: HashMap<[u8; 8], String>,
}

impl SchemaRegistry {
    /// Loads every `*.avsc` file of a directory. A missing directory yields an empty registry.
    pub fn load_dir(dir: &Path) -> Result<Self, Vec<SchemaError>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(vec![SchemaError::Io {
                    path: dir.display().to_string(),
                    source,
                }])
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            let display = path.display().to_string();
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match std::fs::read_to_string(&path) {
                Ok(text) => files.push((name, display, text)),
                Err(source) => errors.push(SchemaError::Io {
                    path: display,
                    source,
                }),
            }
        }
        match Self::from_texts(files) {
            Ok(reg) if errors.is_empty() => Ok(reg),
            Ok(_) => Err(errors),
            Err(mut more) => {
                errors.append(&mut more);
                Err(errors)
            }
        }
    }

    /// Builds a registry from `(name, origin, JSON text)` triples (files, or the schemas compiled
    /// into the binary).
    pub fn from_texts<N: AsRef<str>, O: AsRef<str>, T: AsRef<str>>(
        schemas: impl IntoIterator<Item = (N, O, T)>,
    ) -> Result<Self, Vec<SchemaError>> {
        let mut reg = SchemaRegistry::default();
        let mut errors = Vec::new();
        for (name, origin, text) in schemas {
            if let Err(e) = reg.add(name.as_ref(), text.as_ref(), origin.as_ref()) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(reg)
        } else {
            Err(errors)
        }
    }

    /// Adds one schema given as JSON text.
    pub fn add(&mut self, name: &str, text: &str, origin: &str) -> Result<(), SchemaError> {
        let schema = Schema::parse_str(text).map_err(|e| SchemaError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        if let Some(prev) = self.by_name.get(name) {
            return Err(SchemaError::Duplicate {
                name: name.to_string(),
                first: prev.name.clone(),
                second: origin.to_string(),
            });
        }
        let built = RabinFingerprintHeader::from_schema(&schema).build_header();
        let mut header = [0u8; SINGLE_OBJECT_HEADER_LEN];
        header.copy_from_slice(&built[..SINGLE_OBJECT_HEADER_LEN]);
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&header[2..]);
        self.by_fingerprint.insert(fp, name.to_string());
        self.by_name.insert(
            name.to_string(),
            RegisteredSchema {
                name: name.to_string(),
                schema,
                header,
            },
        );
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&RegisteredSchema> {
        self.by_name.get(name)
    }

    /// The schema whose fingerprint a single-object encoded payload carries.
    pub fn by_fingerprint(&self, fp: &[u8]) -> Option<&RegisteredSchema> {
        let key: [u8; 8] = fp.try_into().ok()?;
        self.by_fingerprint
            .get(&key)
            .and_then(|n| self.by_name.get(n))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// True when the payload starts with the single-object marker.
pub fn is_single_object(payload: &[u8]) -> bool {
    payload.len() >= SINGLE_OBJECT_HEADER_LEN && payload[..2] == SINGLE_OBJECT_MAGIC
}
