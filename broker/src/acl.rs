//! Access control (SPEC §3): identities get `publish`, `consume` and `admin` rights on
//! channel-name prefixes. Anything not granted is refused.

use std::path::Path;

use serde::Deserialize;

/// A right on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Publish,
    Consume,
    Admin,
}

impl Right {
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Publish => "publish",
            Right::Consume => "consume",
            Right::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub identity: String,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
    #[serde(default)]
    pub admin: Vec<String>,
}

/// Whether prefix lists grant `right` on `channel`: a prefix of the right's list or of the
/// admin list (admin implies every right). Shared by ACL grants and tokens.
pub fn grants(
    publish: &[String],
    consume: &[String],
    admin: &[String],
    right: Right,
    channel: &str,
) -> bool {
    let matches = |prefixes: &[String]| prefixes.iter().any(|p| channel.starts_with(p.as_str()));
    matches(admin)
        || match right {
            Right::Publish => matches(publish),
            Right::Consume => matches(consume),
            Right::Admin => false,
        }
}

/// The parsed ACL file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    #[serde(default)]
    pub grant: Vec<Grant>,
}

/// The ACL `serve` writes on an empty data directory.
pub const DEFAULT_ACL: &str = r#"# DirectMQ access control. Identities are client-certificate common names.
# Each grant gives rights on channel-name prefixes; "" is every channel.
#
# [[grant]]
# identity = "dc-b-agent"
# consume = ["dc-a/"]          # read and commit channels under dc-a/
# publish = ["dc-b-control/"]  # publish under dc-b-control/

[[grant]]
identity = "admin"
admin = [""]
"#;

impl Acl {
    pub fn parse(text: &str) -> Result<Acl, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("could not read the ACL file {}: {e}", path.display()))?;
        Acl::parse(&text).map_err(|e| format!("the ACL file {} is invalid: {e}", path.display()))
    }

    /// Whether `identity` holds `right` on `channel`. Admin implies every right.
    pub fn allows(&self, identity: &str, right: Right, channel: &str) -> bool {
        self.grant
            .iter()
            .filter(|g| g.identity == identity)
            .any(|g| grants(&g.publish, &g.consume, &g.admin, right, channel))
    }

    /// Whether `identity` may see `channel` in listings: it may consume or administer it.
    pub fn may_see(&self, identity: &str, channel: &str) -> bool {
        self.allows(identity, Right::Consume, channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_apply_by_prefix_and_admin_implies_all() {
        let acl = Acl::parse(
            r#"
            [[grant]]
            identity = "dc-b-agent"
            consume = ["dc-a/"]
            publish = ["dc-b-control/"]
            [[grant]]
            identity = "admin"
            admin = [""]
            "#,
        )
        .unwrap();
        assert!(acl.allows("dc-b-agent", Right::Consume, "dc-a/x"));
        assert!(!acl.allows("dc-b-agent", Right::Publish, "dc-a/x"));
        assert!(acl.allows("dc-b-agent", Right::Publish, "dc-b-control/y"));
        assert!(!acl.allows("dc-b-agent", Right::Admin, "dc-a/x"));
        assert!(!acl.allows("nobody", Right::Consume, "dc-a/x"));
        assert!(acl.allows("admin", Right::Admin, "anything"));
        assert!(acl.allows("admin", Right::Publish, "anything"));
    }

    #[test]
    fn the_default_acl_grants_admin_everything() {
        let acl = Acl::parse(DEFAULT_ACL).unwrap();
        assert!(acl.allows("admin", Right::Admin, "x/y"));
        assert!(!acl.allows("other", Right::Consume, "x/y"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Acl::parse("[[grant]]\nidentity = \"a\"\nconsum = [\"\"]\n").is_err());
    }
}
