//! Avro schemas from `schemas/`, looked up by name (to write) and by fingerprint (to read).
//!
//! When a schema changes, its previous version stays as `<name>.v<N>.avsc`: records are written
//! with `<name>.avsc` only, and read with whichever version wrote them (its fields missing from a
//! newer version take their defaults), so a topic's older records — and instances not yet upgraded
//! during a rolling deploy — stay readable.
//!
//! Records use Avro single-object encoding: `C3 01`, the 8-byte CRC-64-AVRO (Rabin) fingerprint of the
//! writer's schema, then the binary datum. A reader needs only the schema files to decode them.

use std::collections::HashMap;
use std::path::Path;

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::schema::SchemaKind as Kind;
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
    /// Named types of the schema by full name (what `Ref`s point at), for the bounds check.
    names: std::sync::Arc<HashMap<apache_avro::schema::Name, Schema>>,
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
        let names = apache_avro::schema::ResolvedSchema::try_from(&schema)
            .map(|r| {
                r.get_names()
                    .iter()
                    .map(|(n, s)| (n.clone(), (*s).clone()))
                    .collect()
            })
            .map_err(|e| SchemaError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        self.by_fingerprint.insert(fp, name.to_string());
        self.by_name.insert(
            name.to_string(),
            RegisteredSchema {
                name: name.to_string(),
                schema,
                header,
                names: std::sync::Arc::new(names),
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

/// Items of an array or map whose encoding can take no bytes (nulls, empty records) cannot be
/// bounded by the record's size; this many are allowed per datum, in all its blocks.
const MAX_ZERO_SIZE_ITEMS: usize = 4096;

impl RegisteredSchema {
    /// Walks a binary datum along the schema without decoding it and checks that every length and
    /// count it declares fits in the bytes that are there. An 18-byte record whose first string
    /// claims 536 MB is refused here, before a decoder allocates for it.
    pub fn check_datum_bounds(&self, datum: &[u8]) -> Result<(), String> {
        let mut scan = Scan {
            buf: datum,
            pos: 0,
            names: &self.names,
            depth: 0,
            zero_items: 0,
        };
        scan.value(&self.schema)
    }
}

struct Scan<'a> {
    buf: &'a [u8],
    pos: usize,
    names: &'a HashMap<apache_avro::schema::Name, Schema>,
    depth: usize,
    /// Items taking no bytes (null, an empty record) declared so far, in every block: bounded in
    /// all, not per block (2-byte block headers of 4,096 each let a 1 MB record declare billions,
    /// each a value the decoder allocates).
    zero_items: usize,
}

impl Scan<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} claims {n} bytes but only {} remain in the record",
                self.remaining()
            ));
        }
        self.pos += n;
        Ok(())
    }

    /// A zig-zag encoded long.
    fn long(&mut self) -> Result<i64, String> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err("the record ends inside a number".into());
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err("a number does not fit in 64 bits".into());
            }
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err("a number does not fit in 64 bits".into())
    }

    fn len(&mut self, what: &str) -> Result<usize, String> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| format!("{what} has a negative length {n}"))
    }

    /// The fewest bytes a value of `s` takes (0 for null and empty records).
    fn min_size(&self, s: &Schema, depth: usize) -> usize {
        if depth > 16 {
            return 1;
        }
        match s {
            Schema::Null => 0,
            Schema::Float => 4,
            Schema::Double => 8,
            Schema::Duration => 12,
            Schema::Fixed(f) => f.size,
            Schema::Record(r) => r
                .fields
                .iter()
                .map(|f| self.min_size(&f.schema, depth + 1))
                .sum(),
            Schema::Decimal(d) => self.min_size(&d.inner, depth + 1),
            Schema::Ref { name } => self
                .names
                .get(name)
                .map(|s| self.min_size(s, depth + 1))
                .unwrap_or(1),
            _ => 1,
        }
    }

    fn blocks(&mut self, item: &Schema, key: bool, what: &str) -> Result<(), String> {
        loop {
            let raw = self.long()?;
            if raw == 0 {
                return Ok(());
            }
            if raw < 0 {
                // A negative count is followed by the block's size in bytes.
                let _size = self.long()?;
            }
            let count = raw.unsigned_abs() as usize;
            let min = self.min_size(item, 0) + usize::from(key);
            let fits = match self.remaining().checked_div(min) {
                Some(most) => count <= most,
                None => {
                    self.zero_items = self.zero_items.saturating_add(count);
                    self.zero_items <= MAX_ZERO_SIZE_ITEMS
                }
            };
            if !fits {
                return Err(format!(
                    "{what} claims {count} items but only {} bytes remain in the record",
                    self.remaining()
                ));
            }
            for _ in 0..count {
                if key {
                    let n = self.len("a map key")?;
                    self.take(n, "a map key")?;
                }
                self.value(item)?;
            }
        }
    }

    fn value(&mut self, s: &Schema) -> Result<(), String> {
        self.depth += 1;
        if self.depth > 64 {
            return Err("the record nests more than 64 levels".into());
        }
        let r = match s {
            Schema::Null => Ok(()),
            Schema::Boolean => self.take(1, "a boolean"),
            Schema::Float => self.take(4, "a float"),
            Schema::Double => self.take(8, "a double"),
            Schema::Duration => self.take(12, "a duration"),
            Schema::Fixed(f) => self.take(f.size, "a fixed"),
            Schema::Bytes | Schema::String | Schema::BigDecimal | Schema::Uuid => {
                let n = self.len("a string or bytes")?;
                self.take(n, "a string or bytes")
            }
            Schema::Decimal(d) => self.value(&d.inner),
            Schema::Array(a) => self.blocks(&a.items, false, "an array"),
            Schema::Map(m) => self.blocks(&m.types, true, "a map"),
            Schema::Union(u) => {
                let i = self.long()?;
                let v = usize::try_from(i)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or_else(|| format!("union branch {i} does not exist"))?;
                self.value(v)
            }
            Schema::Record(r) => r.fields.iter().try_for_each(|f| self.value(&f.schema)),
            Schema::Ref { name } => {
                let names = self.names;
                let target = names
                    .get(name)
                    .ok_or_else(|| format!("schema refers to unknown type {}", name.name))?;
                self.value(target)
            }
            // Int, Long, Enum and the logical types over them: one variable-length number.
            _ => self.long().map(|_| ()),
        };
        self.depth -= 1;
        r
    }
}

impl RegisteredSchema {
    /// Writes a JSON value as this schema's binary datum, walking the schema once (no intermediate
    /// Avro value tree: that path — `Value::from`, `resolve`, `to_avro_datum` — took ~19 µs for a
    /// task record against JSON's ~1 µs, and doubled a stage's CPU on Avro topics). It writes exactly
    /// what that path writes (a property test compares them under every schema): objects and arrays
    /// where a record's field wants a string become JSON text (see `codec`), a union's branch is
    /// chosen as apache_avro chooses it. `None` for anything it does not handle the same way (a
    /// logical type, bytes, fixed, maps, a value that does not fit): the caller then takes the
    /// value-tree path, which writes the record or says what is wrong with it.
    pub fn write_json(&self, json: &serde_json::Value, out: &mut Vec<u8>) -> Option<()> {
        let start = out.len();
        let r = Write {
            names: &self.names,
            out,
        }
        .value(json, &self.schema, true, 0);
        if r.is_none() {
            out.truncate(start);
        }
        r
    }
}

struct Write<'a> {
    names: &'a HashMap<apache_avro::schema::Name, Schema>,
    out: &'a mut Vec<u8>,
}

/// How apache_avro's `Value::from` sees a JSON value (`Int` for integers that fit 32 bits).
fn kind_of(v: &serde_json::Value) -> Option<Kind> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => Kind::Null,
        J::Bool(_) => Kind::Boolean,
        J::Number(n) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => Kind::Int,
            Some(_) => Kind::Long,
            // A u64 above i64::MAX is wrapped by that path: leave it to it.
            None if n.is_f64() => Kind::Double,
            None => return None,
        },
        J::String(_) => Kind::String,
        J::Array(_) => Kind::Array,
        J::Object(_) => Kind::Map,
    })
}

/// The kind a union branch of this schema is indexed by, for the ones written here.
fn branch_kind(s: &Schema) -> Option<Kind> {
    let k = Kind::from(s);
    matches!(
        k,
        Kind::Null
            | Kind::Boolean
            | Kind::Int
            | Kind::Long
            | Kind::Double
            | Kind::String
            | Kind::Array
    )
    .then_some(k)
}

impl Write<'_> {
    /// A zig-zag, variable-length long (also ints, lengths, counts, union and enum indexes).
    fn long(&mut self, n: i64) {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            self.out.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.out.push(z as u8);
    }

    fn string(&mut self, s: &str) {
        self.long(s.len() as i64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// `text`: objects and arrays may become JSON text here (in records reached through records
    /// and unions, not inside arrays — as `codec`'s conversion does).
    fn value(&mut self, v: &serde_json::Value, s: &Schema, text: bool, depth: usize) -> Option<()> {
        use serde_json::Value as J;
        if depth > 64 {
            return None;
        }
        match (s, v) {
            (Schema::Null, J::Null) => {}
            (Schema::Boolean, J::Bool(b)) => self.out.push(u8::from(*b)),
            (Schema::Int, J::Number(n)) => self.long(i32::try_from(n.as_i64()?).ok()?.into()),
            (Schema::Long, J::Number(n)) => self.long(n.as_i64()?),
            (Schema::Float, J::Number(n)) => {
                kind_of(v)?;
                // An integer rounds once, straight to f32 (as apache_avro's `n as f32`), not via f64.
                let x = match n.as_i64() {
                    Some(i) => i as f32,
                    None => n.as_f64()? as f32,
                };
                self.out.extend_from_slice(&x.to_le_bytes())
            }
            (Schema::Double, J::Number(n)) => {
                kind_of(v)?;
                self.out.extend_from_slice(&n.as_f64()?.to_le_bytes())
            }
            (Schema::String, J::String(t)) => self.string(t),
            (Schema::String, J::Object(_) | J::Array(_)) if text => self.string(&v.to_string()),
            (Schema::Enum(e), J::String(t)) => {
                let i = e.symbols.iter().position(|x| x == t)?;
                self.long(i as i64);
            }
            (Schema::Array(a), J::Array(items)) => {
                if !items.is_empty() {
                    self.long(items.len() as i64);
                    for item in items {
                        self.value(item, &a.items, false, depth + 1)?;
                    }
                }
                self.long(0);
            }
            (Schema::Record(r), J::Object(fields)) => {
                for f in &r.fields {
                    match (fields.get(&f.name), &f.default) {
                        (Some(x), _) => self.value(x, &f.schema, text, depth + 1)?,
                        // A missing field takes its default; a union's default is of its first branch.
                        (None, Some(d)) => match &f.schema {
                            Schema::Union(u) => {
                                self.long(0);
                                self.value(d, u.variants().first()?, false, depth + 1)?;
                            }
                            other => self.value(d, other, false, depth + 1)?,
                        },
                        (None, None) => return None,
                    }
                }
            }
            (Schema::Union(u), _) => self.union(u.variants(), v, text, depth)?,
            // `codec`'s JSON-text conversion does not follow references: neither does this.
            (Schema::Ref { name }, _) => {
                let target = self.names.get(name)?;
                self.value(v, target, false, depth + 1)?;
            }
            _ => return None,
        }
        Some(())
    }

    /// A union's branch, chosen as apache_avro chooses it: objects and arrays as JSON text when the
    /// union has a string and no record, map or array; else the branch of the value's own kind;
    /// else the first branch the value fits (numbers widen; an object is the first record it fits).
    fn union(
        &mut self,
        vs: &[Schema],
        v: &serde_json::Value,
        text: bool,
        depth: usize,
    ) -> Option<()> {
        use serde_json::Value as J;
        let simple =
            |s: &Schema| branch_kind(s).is_some() || matches!(s, Schema::Float | Schema::Record(_));
        if !vs.iter().all(simple) {
            return None;
        }
        let has = |k: Kind| vs.iter().position(|s| branch_kind(s) == Some(k));
        let structured = vs
            .iter()
            .any(|s| matches!(s, Schema::Record(_) | Schema::Array(_)));
        if text && matches!(v, J::Object(_) | J::Array(_)) && !structured {
            let i = has(Kind::String)?;
            self.long(i as i64);
            self.string(&v.to_string());
            return Some(());
        }
        let kind = kind_of(v)?;
        if let Some(i) = has(kind) {
            self.long(i as i64);
            return self.value(v, &vs[i], text, depth + 1);
        }
        match kind {
            // An int widens to the first long, float or double; a long or double to a float or
            // double (a long before them would narrow to an int: left to apache_avro).
            Kind::Int | Kind::Long | Kind::Double => {
                let (i, s) = vs.iter().enumerate().find(|(_, s)| {
                    matches!(
                        s,
                        Schema::Int | Schema::Long | Schema::Float | Schema::Double
                    ) && !(kind == Kind::Double && matches!(s, Schema::Int | Schema::Long))
                })?;
                if kind == Kind::Long && matches!(s, Schema::Int) {
                    return None;
                }
                self.long(i as i64);
                self.value(v, s, text, depth + 1)
            }
            Kind::Map => {
                // Only the first record is prepared for JSON text; with two, leave it.
                let mut records = vs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| matches!(s, Schema::Record(_)));
                let (i, s) = records.next()?;
                if records.next().is_some() {
                    return None;
                }
                self.long(i as i64);
                self.value(v, s, text, depth + 1)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items that take no bytes are bounded across every block of a datum, not per block: a
    /// record of 2-byte block headers declaring 4,096 nulls each would have the decoder allocate
    /// billions of values.
    #[test]
    fn zero_size_items_are_bounded_in_all() {
        let mut reg = SchemaRegistry::default();
        reg.add(
            "nulls",
            r#"{"type": "record", "name": "N", "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}"#,
            "test",
        )
        .expect("schema");
        let s = reg.get("nulls").expect("registered");
        // A block of n items: zig-zag n, then nothing per null item; the array ends with 0.
        let zigzag = |n: u64| -> Vec<u8> {
            let mut v = n << 1;
            let mut out = Vec::new();
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(b);
                    return out;
                }
                out.push(b | 0x80);
            }
        };
        let datum = |blocks: usize, each: u64| -> Vec<u8> {
            let mut d = Vec::new();
            for _ in 0..blocks {
                d.extend(zigzag(each));
            }
            d.push(0);
            d
        };
        assert!(
            s.check_datum_bounds(&datum(1, 4096)).is_ok(),
            "one full block"
        );
        assert!(
            s.check_datum_bounds(&datum(4, 1024)).is_ok(),
            "4,096 in all"
        );
        let e = s
            .check_datum_bounds(&datum(2, 4096))
            .expect_err("8,192 in two blocks");
        assert!(e.contains("claims 4096 items"), "{e}");
        assert!(s.check_datum_bounds(&datum(5000, 4096)).is_err());
    }
}
