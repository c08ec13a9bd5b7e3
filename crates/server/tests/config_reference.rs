//! docs/configuration.md, the configuration reference, kept true to the config structs.
//!
//! The reference's tables are generated here, from three sources that are the code itself:
//!
//! - the key paths and their defaults: `Config::default()` (with one listener, an `[admin]`
//!   table, an `[auth.http]` table and one user) serialized field by field. JSON rather than
//!   TOML, because TOML has no null and would silently drop every `Option` key left unset;
//! - each key's description and Rust type: the doc comments and field declarations in
//!   `crates/server/src/config.rs`, read as text (a field without a doc comment fails);
//! - ranges and enum values: `Config::integer_ranges()` (what validation applies) and the
//!   deserializer's own "expected one of" list for a wrong value.
//!
//! `reference_is_up_to_date` compares the generated part of the file with what the code gives
//! now; `PETREL_BLESS=1 cargo test -p petrel-server --test config_reference` rewrites it. The
//! other tests check the file as it stands, independently of the generator: every key
//! documented with its default and nothing else, and every key in `default_config_toml()`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;

use petrel_server::config::{
    default_config_toml, AdminConfig, BridgeConfig, BridgeTopic, Config, HttpAuthConfig, UserConfig,
};

/// The file the structs are declared in, read for doc comments and field types.
const CONFIG_SOURCE: &str = include_str!("../src/config.rs");

const BEGIN: &str = "<!-- BEGIN GENERATED REFERENCE: edit the doc comments in \
                     crates/server/src/config.rs, then run \
                     `PETREL_BLESS=1 cargo test -p petrel-server --test config_reference` -->";
const END: &str = "<!-- END GENERATED REFERENCE -->";

const REGENERATE: &str = "regenerate it with \
                          `PETREL_BLESS=1 cargo test -p petrel-server --test config_reference` \
                          (descriptions come from the doc comments in crates/server/src/config.rs)";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md")
}

/// The file as the tests see it. With `PETREL_BLESS` set, its generated part is first brought
/// up to date, once for all the tests of this run, so that they read the file as rewritten.
fn read_doc() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = doc_path();
        let doc = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; {REGENERATE}", path.display()));
        if std::env::var_os("PETREL_BLESS").is_none() {
            return doc;
        }
        let range = generated_range(&doc);
        let updated = format!("{}{}{}", &doc[..range.start], generate(), &doc[range.end..]);
        if updated != doc {
            std::fs::write(&path, &updated).expect("write docs/configuration.md");
            eprintln!("rewrote the reference in {}", path.display());
        }
        updated
    })
}

/// Where the generated part of the file lies, markers and the line break after them included.
fn generated_range(doc: &str) -> Range<usize> {
    let (Some(start), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!(
            "{} lacks the markers of its generated part:\n{BEGIN}\n...\n{END}",
            doc_path().display()
        );
    };
    let end = end + END.len();
    let end = end + usize::from(doc[end..].starts_with('\n'));
    start..end
}

// ---------------------------------------------------------------------------------------------
// What the code says
// ---------------------------------------------------------------------------------------------

/// A configuration with every table present, so that serializing it reaches every key.
fn reference_config() -> Config {
    let mut config = Config::default();
    assert_eq!(config.listeners.len(), 1, "the default has one listener");
    config.admin = Some(AdminConfig::default());
    config.auth.http = Some(HttpAuthConfig::default());
    config.auth.users = vec![UserConfig {
        name: String::new(),
        password: None,
        scram_sha256: None,
    }];
    config.bridges = vec![BridgeConfig {
        topics: vec![BridgeTopic::default()],
        ..BridgeConfig::default()
    }];
    config
}

/// What the reference says a key defaults to.
#[derive(Debug, Clone, PartialEq)]
enum DefaultValue {
    /// Written in TOML, e.g. `"10s"`, `1024`, `true`.
    Value(toml::Value),
    /// An `Option` left unset.
    Unset,
    /// No default: each table of an array must give it.
    Required,
}

impl DefaultValue {
    /// The text of the table's default column.
    fn cell(&self) -> String {
        match self {
            DefaultValue::Value(value) => format!("`{value}`"),
            DefaultValue::Unset => "unset".to_owned(),
            DefaultValue::Required => "required".to_owned(),
        }
    }
}

/// Key paths (`listeners[].bind`) and their serialized defaults, walking tables and the first
/// table of each array of tables.
fn serialized_keys() -> BTreeMap<String, serde_json::Value> {
    fn walk(
        prefix: &str,
        value: &serde_json::Value,
        out: &mut BTreeMap<String, serde_json::Value>,
    ) {
        let serde_json::Value::Object(fields) = value else {
            out.insert(prefix.to_owned(), value.clone());
            return;
        };
        for (name, value) in fields {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                serde_json::Value::Object(_) => walk(&path, value, out),
                serde_json::Value::Array(items)
                    if items.first().is_some_and(serde_json::Value::is_object) =>
                {
                    for item in items {
                        walk(&format!("{path}[]"), item, out);
                    }
                }
                _ => {
                    out.insert(path, value.clone());
                }
            }
        }
    }
    let value = serde_json::to_value(reference_config()).expect("Config serializes");
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    out
}

/// One field as declared in config.rs.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    /// The Rust type as written, e.g. `Option<Duration>`.
    ty: String,
    doc: String,
    /// Neither the struct nor the field has `#[serde(default)]`.
    required: bool,
}

/// One struct of config.rs: its fields in declaration order.
#[derive(Debug, Clone)]
struct Struct {
    fields: Vec<Field>,
}

/// The `pub struct`s of config.rs with their fields, doc comments and serde defaults. A small
/// reader for the way that file is written (one field per line, `///` comments, attributes
/// that may span lines), not a Rust parser: anything it does not understand fails a test.
fn source_structs() -> BTreeMap<String, Struct> {
    let mut structs = BTreeMap::new();
    let mut doc: Vec<String> = Vec::new();
    let mut attrs = String::new();
    let mut in_attr = false;
    let mut current: Option<(String, bool, Struct)> = None;
    for line in CONFIG_SOURCE.lines() {
        let trimmed = line.trim();
        if in_attr {
            attrs.push_str(trimmed);
            in_attr = !trimmed.ends_with(")]");
            continue;
        }
        if let Some(text) = trimmed.strip_prefix("///") {
            doc.push(text.strip_prefix(' ').unwrap_or(text).to_owned());
            continue;
        }
        if trimmed.starts_with("#[") {
            attrs.push_str(trimmed);
            in_attr = !trimmed.ends_with(']');
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("pub struct ") {
            let name = rest.trim_end_matches(" {").trim().to_owned();
            let defaulted = attrs.contains("#[serde(default");
            current = Some((name, defaulted, Struct { fields: Vec::new() }));
        } else if let Some((_, defaulted, item)) = current.as_mut() {
            if line == "}" {
                let (name, _, item) = current.take().expect("in a struct");
                structs.insert(name, item);
            } else if let Some(rest) = trimmed.strip_prefix("pub ") {
                let (name, ty) = rest
                    .trim_end_matches(',')
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("config.rs: cannot read the field {trimmed:?}"));
                let field_default = attrs.contains("#[serde(default)]");
                item.fields.push(Field {
                    name: name.to_owned(),
                    ty: ty.to_owned(),
                    doc: paragraphs(&doc),
                    required: !*defaulted && !field_default,
                });
            }
        }
        doc.clear();
        attrs.clear();
    }
    structs
}

/// Doc comment lines joined into paragraphs (an empty `///` line separates them).
fn paragraphs(lines: &[String]) -> String {
    lines
        .split(|line| line.is_empty())
        .filter(|p| !p.is_empty())
        .map(|p| p.join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A table of the file: `""` (top level), `listeners[]`, `mqtt`, `auth.http`, ...
#[derive(Debug, Clone)]
struct Section {
    path: String,
    /// The doc comment of the field that holds the table (empty for the top level).
    doc: String,
    keys: Vec<Key>,
}

#[derive(Debug, Clone)]
struct Key {
    path: String,
    field: Field,
}

/// The tables of the configuration in declaration order, found by following the fields of
/// `Config` whose type is another struct of config.rs.
fn sections() -> Vec<Section> {
    let structs = source_structs();
    let mut out = Vec::new();
    fn visit(
        structs: &BTreeMap<String, Struct>,
        name: &str,
        path: &str,
        doc: &str,
        out: &mut Vec<Section>,
    ) {
        let item = structs
            .get(name)
            .unwrap_or_else(|| panic!("config.rs: no struct {name}"));
        let index = out.len();
        out.push(Section {
            path: path.to_owned(),
            doc: doc.to_owned(),
            keys: Vec::new(),
        });
        for field in &item.fields {
            let key = if path.is_empty() {
                field.name.clone()
            } else {
                format!("{path}.{}", field.name)
            };
            let (inner, array) = unwrap_type(&field.ty);
            if structs.contains_key(inner) {
                let key = if array { format!("{key}[]") } else { key };
                visit(structs, inner, &key, &field.doc, out);
            } else {
                out[index].keys.push(Key {
                    path: key,
                    field: field.clone(),
                });
            }
        }
    }
    visit(&structs, "Config", "", "", &mut out);
    out
}

/// `Option<T>` → (`T`, false), `Vec<T>` → (`T`, true), `T` → (`T`, false).
fn unwrap_type(ty: &str) -> (&str, bool) {
    if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        return (inner, false);
    }
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|t| t.strip_suffix('>')) {
        return (inner, true);
    }
    (ty, false)
}

/// The keys of every section with their defaults.
fn expected_defaults() -> BTreeMap<String, DefaultValue> {
    let serialized = serialized_keys();
    let mut out = BTreeMap::new();
    for section in sections() {
        for key in section.keys {
            let value = serialized.get(&key.path).unwrap_or_else(|| {
                panic!("{} is declared in config.rs but not serialized", key.path)
            });
            let default = if key.field.required {
                DefaultValue::Required
            } else if value.is_null() {
                DefaultValue::Unset
            } else {
                DefaultValue::Value(toml::Value::try_from(value).unwrap_or_else(|e| {
                    panic!("{}: default {value} is not a TOML value: {e}", key.path)
                }))
            };
            out.insert(key.path, default);
        }
    }
    out
}

/// A document that sets `path` to `value`, e.g. `[[listeners]]\nprotocol = "?"`.
fn document_setting(path: &str, value: &str) -> String {
    let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
    if table.is_empty() {
        return format!("{key} = {value}\n");
    }
    // Each array on the way gets its table header (`[[bridges]]`, then `[[bridges.topics]]`).
    let segments: Vec<&str> = table.split('.').collect();
    let mut doc = String::new();
    let mut prefix = String::new();
    for (i, segment) in segments.iter().enumerate() {
        let (name, array) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (*segment, false),
        };
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(name);
        if array {
            doc.push_str(&format!("[[{prefix}]]\n"));
        } else if i == segments.len() - 1 {
            doc.push_str(&format!("[{prefix}]\n"));
        }
    }
    doc.push_str(&format!("{key} = {value}\n"));
    doc
}

/// The values an enum-typed key accepts, in the deserializer's own words: a value it does not
/// know makes it list them ("unknown value `?`, expected one of `tcp`, `tls`, ...").
fn accepted_values(path: &str) -> Vec<String> {
    let doc = document_setting(path, "\"?\"");
    let err = match Config::from_toml_str(&doc, "probe") {
        Ok(_) => panic!("{path} = \"?\" was accepted"),
        Err(e) => e.to_string(),
    };
    let Some((_, expected)) = err.split_once("expected") else {
        panic!("{path}: no list of values in {err:?}");
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|value| format!("`\"{value}\"`"))
        .collect()
}

/// The type column: what to write, with its range for integers.
fn describe_type(key: &Key, ranges: &BTreeMap<String, (u64, Option<u64>)>) -> String {
    let (inner, array) = unwrap_type(&key.field.ty);
    if array {
        return match inner {
            "String" => "array of strings".to_owned(),
            "PathBuf" => "array of paths".to_owned(),
            _ => panic!(
                "{}: describe arrays of {inner} in config_reference.rs's describe_type",
                key.path
            ),
        };
    }
    let integer_max = match inner {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => None,
        _ => {
            return match inner {
                "bool" => "boolean".to_owned(),
                "Duration" => "duration".to_owned(),
                "SocketAddr" => "IP:port".to_owned(),
                "PathBuf" => "path".to_owned(),
                "String" => "string".to_owned(),
                _ => {
                    let values = accepted_values(&key.path);
                    assert!(
                        values.len() >= 2,
                        "{}: type {inner} is neither known here nor an enum with values",
                        key.path
                    );
                    let (last, rest) = values.split_last().expect("two values or more");
                    format!("{} or {last}", rest.join(", "))
                }
            };
        }
    };
    let (min, max) = ranges.get(&key.path).copied().unwrap_or((0, integer_max));
    match max {
        Some(max) => format!("integer, {min} to {max}"),
        None => format!("integer ≥ {min}"),
    }
}

/// When a change to the key takes effect. Mirrors `server::reload_config` (the whole `[auth]`
/// and `[mqtt]` tables are put in service on SIGHUP) and `server::reload_tls`.
fn reload(path: &str) -> &'static str {
    if path.starts_with("mqtt.") || path.starts_with("auth.") {
        "SIGHUP"
    } else if matches!(
        path,
        "listeners[].cert" | "listeners[].key" | "listeners[].client_ca"
    ) {
        "restart; the file: SIGHUP, on change"
    } else {
        "restart"
    }
}

/// How a section is headed: `Top level`, `` `[[listeners]]` ``, `` `[mqtt]` ``.
fn section_title(path: &str) -> String {
    match path {
        "" => "Top level".to_owned(),
        _ => match path.strip_suffix("[]") {
            Some(array) => format!("`[[{array}]]`"),
            None => format!("`[{path}]`"),
        },
    }
}

/// A table cell: `|` would end it and a line break would end the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The generated part of docs/configuration.md, markers included.
fn generate() -> String {
    let defaults = expected_defaults();
    let ranges: BTreeMap<String, (u64, Option<u64>)> = Config::integer_ranges()
        .into_iter()
        .map(|(key, min, max)| (key, (min, max)))
        .collect();
    let mut out = format!("{BEGIN}\n");
    for section in sections() {
        out.push_str(&format!("\n## {}\n\n", section_title(&section.path)));
        if section.path.is_empty() {
            out.push_str("Keys written before the first table.\n\n");
        } else if !section.doc.is_empty() {
            out.push_str(&format!("{}\n\n", section.doc));
        }
        if section.keys.is_empty() {
            continue;
        }
        out.push_str("| key | type | default | takes effect |\n|---|---|---|---|\n");
        for key in &section.keys {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                key.path,
                cell(&describe_type(key, &ranges)),
                cell(&defaults[&key.path].cell()),
                reload(&key.path),
            ));
        }
        for key in &section.keys {
            assert!(
                !key.field.doc.is_empty(),
                "{} has no doc comment in crates/server/src/config.rs: write one for operators",
                key.path
            );
            out.push_str(&format!("\n### `{}`\n\n{}\n", key.path, key.field.doc));
        }
    }
    out.push_str(&format!("\n{END}\n"));
    out
}

// ---------------------------------------------------------------------------------------------
// What the file says
// ---------------------------------------------------------------------------------------------

/// The keys the document names in a table row (first cell) with the row's default cell, and
/// the keys it gives a `###` heading.
struct Documented {
    rows: BTreeMap<String, String>,
    headings: BTreeSet<String>,
    sections: BTreeSet<String>,
}

fn documented(doc: &str) -> Documented {
    let mut rows = BTreeMap::new();
    let mut headings = BTreeSet::new();
    let mut sections = BTreeSet::new();
    for line in doc.lines() {
        if let Some(rest) = line.strip_prefix("| `") {
            let cells: Vec<&str> = line.split(" | ").collect();
            let key = rest.split('`').next().unwrap_or_default().to_owned();
            let default = cells.get(2).copied().unwrap_or_default().to_owned();
            assert!(
                rows.insert(key.clone(), default).is_none(),
                "docs/configuration.md has two rows for {key}"
            );
        } else if let Some(rest) = line.strip_prefix("### `") {
            headings.insert(rest.trim_end_matches('`').to_owned());
        } else if let Some(rest) = line.strip_prefix("## ") {
            sections.insert(rest.to_owned());
        }
    }
    Documented {
        rows,
        headings,
        sections,
    }
}

/// Turns `# key = value` and `# [table]` lines back into TOML, to see the keys a printed
/// default config shows only as commented examples.
fn uncomment(text: &str) -> String {
    let is_key = |s: &str| {
        s.split_once(" = ").is_some_and(|(key, _)| {
            key.starts_with(|c: char| c.is_ascii_lowercase())
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
    };
    let is_table = |s: &str| {
        let name = s.trim_start_matches('[').trim_end_matches(']');
        s.starts_with('[')
            && s.ends_with(']')
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
    };
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_key(rest) || is_table(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Key paths of a TOML table and their values, `[]` for the tables of an array.
fn toml_keys(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => toml_keys(&path, inner, out),
            toml::Value::Array(items)
                if !items.is_empty() && items.iter().all(toml::Value::is_table) =>
            {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        toml_keys(&format!("{path}[]"), inner, out);
                    }
                }
            }
            _ => {
                out.insert(path, value.clone());
            }
        }
    }
}

fn difference(a: &BTreeSet<String>, b: &BTreeSet<String>) -> Vec<String> {
    a.difference(b).cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn reference_is_up_to_date() {
    let generated = generate();
    let doc = read_doc();
    let current = &doc[generated_range(doc)];
    if current == generated {
        return;
    }
    let first = current
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .map(|i| {
            format!(
                "first difference, line {} of the generated part:\n  file: {:?}\n  code: {:?}",
                i + 1,
                current.lines().nth(i).unwrap_or_default(),
                generated.lines().nth(i).unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "one of them ends early".to_owned());
    panic!(
        "{} does not match the config structs ({first}); {REGENERATE}",
        doc_path().display()
    );
}

#[test]
fn every_key_is_documented_with_its_default_and_no_other() {
    let expected = expected_defaults();
    let doc = documented(read_doc());
    let keys: BTreeSet<String> = expected.keys().cloned().collect();
    let rows: BTreeSet<String> = doc.rows.keys().cloned().collect();

    let missing = difference(&keys, &rows);
    assert!(
        missing.is_empty(),
        "keys of the config structs without a row in docs/configuration.md: {missing:?}; \
         {REGENERATE}"
    );
    let missing = difference(&keys, &doc.headings);
    assert!(
        missing.is_empty(),
        "keys without a ### heading in docs/configuration.md: {missing:?}; {REGENERATE}"
    );
    let stale = difference(&rows, &keys);
    assert!(
        stale.is_empty(),
        "docs/configuration.md documents keys the config structs do not have: {stale:?}; \
         {REGENERATE}"
    );
    let stale = difference(&doc.headings, &keys);
    assert!(
        stale.is_empty(),
        "docs/configuration.md has headings for keys that do not exist: {stale:?}; {REGENERATE}"
    );
    for (key, default) in &expected {
        assert_eq!(
            doc.rows[key],
            default.cell(),
            "docs/configuration.md gives {key} another default than the code; {REGENERATE}"
        );
    }
    for section in sections().iter().filter(|s| !s.path.is_empty()) {
        let title = section_title(&section.path);
        assert!(
            doc.sections.contains(&title),
            "docs/configuration.md has no section \"## {title}\"; {REGENERATE}"
        );
    }
}

#[test]
fn the_struct_reader_sees_what_serde_sees() {
    // If config.rs is written in a way `source_structs` misreads, a key would lack its doc
    // comment or appear twice; compare with the serialized keys.
    let declared: BTreeSet<String> = sections()
        .into_iter()
        .flat_map(|s| s.keys.into_iter().map(|k| k.path))
        .collect();
    let serialized: BTreeSet<String> = serialized_keys().into_keys().collect();
    assert_eq!(declared, serialized);
    // The reader found the serde defaults: user names are required, the rest defaulted.
    let defaults = expected_defaults();
    assert_eq!(defaults["auth.users[].name"], DefaultValue::Required);
    assert_eq!(defaults["auth.users[].password"], DefaultValue::Unset);
    assert_eq!(
        defaults["listeners[].connect_timeout"],
        DefaultValue::Value(toml::Value::String("10s".into()))
    );
    assert_eq!(
        defaults["mqtt.max_queued_bytes_total"],
        DefaultValue::Value(toml::Value::Integer(4 * 1024 * 1024 * 1024))
    );
}

#[test]
fn default_config_toml_shows_every_key_with_its_default() {
    let expected = expected_defaults();
    let text = uncomment(&default_config_toml());
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("default_config_toml(), uncommented, is not TOML: {e}\n{text}"));
    let mut shown = BTreeMap::new();
    toml_keys("", &table, &mut shown);
    let keys: BTreeSet<String> = expected.keys().cloned().collect();
    let printed: BTreeSet<String> = shown.keys().cloned().collect();
    let missing = difference(&keys, &printed);
    assert!(
        missing.is_empty(),
        "default_config_toml() (crates/server/src/config.rs) lacks these keys, even commented \
         out: {missing:?}"
    );
    let unknown = difference(&printed, &keys);
    assert!(
        unknown.is_empty(),
        "default_config_toml() shows keys the structs do not have: {unknown:?}"
    );
    // Values, commented examples included, are the defaults: except where the default is
    // "nothing" (unset, required, or an empty string such as the hook's URL) and the printed
    // value is an example to fill in.
    for (key, default) in &expected {
        match default {
            DefaultValue::Value(toml::Value::String(s)) if s.is_empty() => {}
            DefaultValue::Value(value) => assert_eq!(
                &shown[key], value,
                "default_config_toml() shows {key} with another value than its default"
            ),
            DefaultValue::Unset | DefaultValue::Required => {}
        }
    }
}

#[test]
fn serialized_config_reads_back_as_itself() {
    // The reference's defaults are the serialized values: they must be what a file holds.
    let mut config = reference_config();
    config.auth.http = Some(HttpAuthConfig {
        url: "http://127.0.0.1:9/auth".into(),
        ..HttpAuthConfig::default()
    });
    config.auth.users = vec![UserConfig {
        name: "alice".into(),
        password: Some("secret".into()),
        scram_sha256: None,
    }];
    config.listeners[0].handshake_timeout = Some(std::time::Duration::from_millis(1500));
    config.bridges[0].name = "b".into();
    config.bridges[0].address = "127.0.0.1:1883".into();
    config.bridges[0].topics[0].filter = "a/#".into();
    let text = toml::to_string(&config).expect("Config serializes to TOML");
    let back = Config::from_toml_str(&text, "serialized").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(back, config, "{text}");
    assert!(text.contains("bind = \"127.0.0.1:1883\""), "{text}");
    assert!(text.contains("handshake_timeout = \"1s 500ms\""), "{text}");
}
