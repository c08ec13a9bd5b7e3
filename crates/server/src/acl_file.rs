//! The ACL file (`[auth] acl_file`): topic authorization rules in TOML, read at start and on
//! reload. Every problem names the file, the line and the rule.
//!
//! ```toml
//! # Rules only allow; what no rule allows is denied.
//! [[rules]]
//! user = "alice"              # who: one of user, client_id, certificate,
//!                             #      anonymous = true, everyone = true
//! access = "both"             # "publish", "subscribe" or "both"
//! topics = ["home/%u/#"]      # %u: the user name, %c: the client id (whole levels)
//!
//! # A client id is the client's own choice, so it proves nothing by itself. A binding
//! # reserves one for some logins: only they may connect with it (and open its session),
//! # and `client_id` rules, which need one, apply to them alone.
//! [[client_ids]]
//! client_id = "plant-7"
//! users = ["ops"]             # user names (a certificate identity serves as one)
//! certificates = ["plc-7"]    # verified client certificate identities
//! anonymous = false           # clients with neither
//! ```

use std::path::{Path, PathBuf};

use petrel_engine::acl::{Access, Acl, Principal, Rule};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AclFileError {
    #[error("cannot read the ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{line}: {message}")]
    Invalid {
        path: PathBuf,
        /// `:N` when the place is known.
        line: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rules: Vec<RuleEntry>,
    #[serde(default)]
    client_ids: Vec<BindingEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingEntry {
    client_id: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    certificates: Vec<String>,
    #[serde(default)]
    anonymous: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    user: Option<String>,
    client_id: Option<String>,
    certificate: Option<String>,
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    everyone: bool,
    access: AccessEntry,
    topics: Vec<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum AccessEntry {
    Publish,
    Subscribe,
    Both,
}

/// Reads and checks an ACL file.
pub fn load(path: &Path) -> Result<Acl, AclFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| AclFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Acl, AclFileError> {
    let invalid = |line: Option<usize>, message: String| AclFileError::Invalid {
        path: path.to_owned(),
        line: line.map(|l| format!(":{l}")).unwrap_or_default(),
        message,
    };
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_at(text, s.start));
        invalid(line, e.message().trim().replace('\n', " "))
    })?;
    let mut rules = Vec::with_capacity(file.rules.len());
    for (i, entry) in file.rules.into_iter().enumerate() {
        let mut who = Vec::new();
        if let Some(u) = entry.user {
            who.push(Principal::User(u));
        }
        if let Some(c) = entry.client_id {
            who.push(Principal::ClientId(c));
        }
        if let Some(c) = entry.certificate {
            who.push(Principal::Certificate(c));
        }
        if entry.anonymous {
            who.push(Principal::Anonymous);
        }
        if entry.everyone {
            who.push(Principal::Everyone);
        }
        if who.len() != 1 {
            return Err(invalid(
                rule_line(text, i),
                format!(
                    "rules[{i}]: name exactly one of user, client_id, certificate, \
                     anonymous = true or everyone = true (found {})",
                    who.len()
                ),
            ));
        }
        if entry.topics.is_empty() {
            return Err(invalid(
                rule_line(text, i),
                format!("rules[{i}].topics: empty; a rule must allow at least one filter"),
            ));
        }
        rules.push(Rule {
            principal: who.remove(0),
            access: match entry.access {
                AccessEntry::Publish => Access::Publish,
                AccessEntry::Subscribe => Access::Subscribe,
                AccessEntry::Both => Access::Both,
            },
            topics: entry.topics,
        });
    }
    let mut bound = std::collections::HashSet::new();
    let mut bindings = Vec::with_capacity(file.client_ids.len());
    for (i, entry) in file.client_ids.into_iter().enumerate() {
        let line = table_line(text, "[[client_ids]]", i);
        if entry.client_id.is_empty() {
            return Err(invalid(
                line,
                format!("client_ids[{i}].client_id: empty; name the client id to bind"),
            ));
        }
        let mut holders: Vec<Principal> = entry.users.into_iter().map(Principal::User).collect();
        holders.extend(entry.certificates.into_iter().map(Principal::Certificate));
        if entry.anonymous {
            holders.push(Principal::Anonymous);
        }
        if holders.is_empty() {
            return Err(invalid(
                line,
                format!(
                    "client_ids[{i}]: binds {:?} to no one; list users, certificates or \
                     anonymous = true",
                    entry.client_id
                ),
            ));
        }
        bound.insert(entry.client_id.clone());
        bindings.push((entry.client_id, holders));
    }
    // A client id rule without a binding would hand its topics to whoever picks the id.
    for (i, rule) in rules.iter().enumerate() {
        if let Principal::ClientId(id) = &rule.principal {
            if !bound.contains(id) {
                return Err(invalid(
                    rule_line(text, i),
                    format!(
                        "rules[{i}].client_id: {id:?} is not bound to any login, so this rule \
                         would apply to whoever connects with that id; add a [[client_ids]] \
                         table with client_id = {id:?} naming its users or certificates"
                    ),
                ));
            }
        }
    }
    let mut acl = Acl::new(rules).map_err(|e| {
        invalid(
            rule_line(text, e.rule - 1),
            format!("rules[{}].topics: {:?}: {}", e.rule - 1, e.topic, e.why),
        )
    })?;
    for (client_id, holders) in bindings {
        acl.bind(client_id, holders);
    }
    Ok(acl)
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of the `index`th `[[rules]]` header.
fn rule_line(text: &str, index: usize) -> Option<usize> {
    table_line(text, "[[rules]]", index)
}

/// The line of the `index`th `header` (e.g. `[[client_ids]]`).
fn table_line(text: &str, header: &str, index: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with(header))
        .nth(index)
        .map(|(n, _)| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_engine::acl::Identity;

    fn parse_text(text: &str) -> Result<Acl, String> {
        parse(Path::new("acl.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_file_of_every_kind_of_rule_reads() {
        let acl = parse_text(
            r#"
[[rules]]
user = "alice"
access = "both"
topics = ["home/%u/#"]

[[rules]]
client_id = "dev-1"
access = "publish"
topics = ["devices/%c/up"]

[[client_ids]]
client_id = "dev-1"
certificates = ["dev-1"]

[[rules]]
certificate = "gateway"
access = "subscribe"
topics = ["gw/#"]

[[rules]]
anonymous = true
access = "subscribe"
topics = ["public/#"]

[[rules]]
everyone = true
access = "subscribe"
topics = ["$SYS/#"]
"#,
        )
        .unwrap();
        assert_eq!(acl.rules().len(), 5);
        let alice = acl.for_client(Identity {
            client_id: "c",
            username: Some("alice"),
            certificate: None,
        });
        assert!(alice.may_publish("home/alice/x"));
        assert!(alice.may_receive("$SYS/broker/uptime"));
        assert!(!alice.may_receive("public/x"));
        let device = |certificate| Identity {
            client_id: "dev-1",
            username: None,
            certificate,
        };
        assert_eq!(acl.may_use_client_id(device(Some("dev-1"))), Some(true));
        assert!(acl
            .for_client(device(Some("dev-1")))
            .may_publish("devices/dev-1/up"));
        assert_eq!(acl.may_use_client_id(device(None)), Some(false));
        assert!(!acl.for_client(device(None)).may_publish("devices/dev-1/up"));
    }

    #[test]
    fn a_client_id_rule_needs_the_id_bound() {
        let err = parse_text(
            "[[rules]]\neveryone = true\naccess = \"both\"\ntopics = [\"x\"]\n\n\
             [[rules]]\nclient_id = \"dev-1\"\naccess = \"both\"\ntopics = [\"d\"]\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("acl.toml:6: rules[1].client_id: \"dev-1\" is not bound"),
            "{err}"
        );
        let err = parse_text("[[client_ids]]\nclient_id = \"dev-1\"\n").unwrap_err();
        assert!(
            err.starts_with("acl.toml:1: client_ids[0]: binds \"dev-1\" to no one"),
            "{err}"
        );
        let err = parse_text("[[client_ids]]\nclient_id = \"d\"\nuser = [\"a\"]\n").unwrap_err();
        assert!(err.contains("user"), "{err}");
    }

    #[test]
    fn mistakes_name_the_line_and_the_rule() {
        let err = parse_text("[[rules]]\nuser = \"a\"\naccess = \"all\"\ntopics = [\"x\"]\n")
            .unwrap_err();
        assert!(err.starts_with("acl.toml:3:"), "{err}");
        let err = parse_text(
            "[[rules]]\neveryone = true\naccess = \"both\"\ntopics = [\"x\"]\n\n\
             [[rules]]\nuser = \"a\"\nclient_id = \"b\"\naccess = \"both\"\ntopics = [\"x\"]\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("acl.toml:6: rules[1]: name exactly one"),
            "{err}"
        );
        let err =
            parse_text("[[rules]]\neveryone = true\naccess = \"both\"\ntopics = [\"a/#/b\"]\n")
                .unwrap_err();
        assert!(
            err.starts_with("acl.toml:1: rules[0].topics: \"a/#/b\""),
            "{err}"
        );
        let err = parse_text("[[rules]]\nuser = \"a\"\naccess = \"both\"\ntopic = [\"x\"]\n")
            .unwrap_err();
        assert!(err.contains("topic"), "{err}");
        let err =
            parse_text("[[rules]]\nuser = \"a\"\naccess = \"both\"\ntopics = []\n").unwrap_err();
        assert!(err.contains("rules[0].topics: empty"), "{err}");
    }
}
